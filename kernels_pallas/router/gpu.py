"""Fused router on Hopper in Mosaic GPU: logits, top-k, expert order and statistics in one read of x.

One CTA = 4 warpgroups over a persistent grid of 128-row tiles, with a load ring written here
(not emit_pipeline: its compute warpgroups must both consume every stage):
- warpgroup 3 issues the TMA loads of x and w into a ring of `stages` slots;
- warpgroups 0 and 1 each accumulate one 64-token block's logits with two bf16 wgmmas per step
  into one fp32 accumulator, x @ w_hi + x @ w_lo (w_gate split as in split.py; bf16 x times a
  bf16 part is exact in fp32, so the sum is the fp32 logits to ~2^-16 relative), then hand the
  block to warpgroup 2 through shared memory and go on with the next tile;
- warpgroup 2 runs each block's epilogue while the others keep the loads streaming: the scores,
  top-k on packed keys (`selection_keys`: one row max per pick gives value and id), the
  renormalised weights, and the block's pick matrix H [64 tokens, E] through one small wgmma,
  L @ H with L lower triangular: for every token and expert, the picks of that expert by the
  block's tokens up to this one (the last row is the block's counts). A second kernel,
  `expert_order` (order_gpu.py), turns the prefixes into the expert order and its inverse and sums
  the statistics (two kernels a call: 8 in the thirteenth session, 16 before). The statistics
  accumulate in shared memory element by element and are summed over rows once, at the end (the
  only warpgroup that reduces across warps, so Mosaic's reduction scratch is its own).
Run in the K-loop warpgroups instead, the epilogue stopped the loads for its ~10k cycles per
block (H100: kernel 0.221 ms against 0.205 now; the K loop alone is 0.188).
"""
import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import _compat
from kernels_pallas.router import split
from kernels_pallas.router.order_gpu import BLOCK, expert_order
from kernels_pallas.router.reference import (RouterSpec, Routing, combine_weights,
                                             scores_and_probs)

ID_BITS = 6  # an expert id in the low bits of a selection key (E = 64)


def selection_keys(sel, col):
  """int32 keys that order like `sel`, ties to the lower id, unique per row: sel's float bits
  made monotone as signed ints, their low ID_BITS replaced by (E - 1 - id). One row max gives
  a pick's value and id. Values closer than 2^-17 relative (below the logits' own ~2^-16
  accuracy) count as ties. Shared by the kernel (Mosaic arrays) and its jnp contract."""
  bits = lax.bitcast_convert_type(sel, jnp.int32)
  ordered = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
  low = (1 << ID_BITS) - 1
  return (ordered & jnp.int32(~low)) | (jnp.int32(low) - col)


def key_expert(key):
  return jnp.int32((1 << ID_BITS) - 1) - (key & jnp.int32((1 << ID_BITS) - 1))


@dataclasses.dataclass(frozen=True)
class Tiling:
  tile_k: int = 64     # contraction step (64 bf16 = one 128-byte swizzle row)
  stages: int = 4      # TMA pipeline depth
  mma_registers: int = 96        # per thread: the two MMA warpgroups hold one [64, E] accumulator
  epilogue_registers: int = 232  # the epilogue warpgroup's top-k (TMA warpgroup: 40)
  lo_product: bool = True    # DEBUG ONLY when False (logits lose w's low bits): times the MMAs
  skip_select: bool = False  # DEBUG ONLY (wrong picks): times the K loop without the epilogue
  profile_space: int = 0   # DEBUG: Mosaic's in-kernel profiler, a range per named scope
  profile_dir: str = ""    # ("main" per MMA block, "epilogue" per block)


# E = 64 (A13B) only: the epilogue's [64, E] f32 arrays take 32 registers each. At E = 192 (Hy3)
# the arrays spill past the register file (the top-k made that kernel 2.2x slower, 0.41 -> 0.89 ms).
DEFAULT = Tiling()


class KernelOut(NamedTuple):
  experts_tk: jax.Array     # int32 [T, k]: picks by score, ties to the lower id
  weights_tk: jax.Array     # f32 [T, k]: renormalised, scaled combine weights
  upto_te: jax.Array        # bf16 [T, E] (exact: <= 64): picks of expert e by the tokens of t's
                            # 64-token block up to t, t included
  stats_spe: jax.Array      # f32 [2, P, E]: per CTA, [0] the normalised probabilities summed
                            # over its tokens, [1] logsumexp(logits)^2 summed per row slot;
                            # P = the CTAs rounded up to 64, the extra rows zero
  logits_te: Optional[jax.Array]   # f32 [T, E] when asked for (the backward's residual)


def select_tiling(num_tokens, dim, num_experts, top_k, x_dtype):
  """The tiling for these shapes, or None where the kernel does not apply (pure Python)."""
  if (jnp.dtype(x_dtype) != jnp.bfloat16 or num_experts != BLOCK or top_k % 8
      or num_tokens % (2 * BLOCK) or dim % DEFAULT.tile_k):
    return None
  return DEFAULT


def why_not(num_tokens, dim, num_experts, top_k, x_dtype):
  if jnp.dtype(x_dtype) != jnp.bfloat16:
    return f"x is {jnp.dtype(x_dtype)}; the fused GPU router takes bf16 activations"
  if num_experts != BLOCK:
    return f"E={num_experts}; the fused GPU router is tiled for E = {BLOCK}"
  if top_k % 8:
    return f"top_k={top_k}; the fused GPU router writes [64, k] wgmma tiles (k a multiple of 8)"
  return f"T={num_tokens} must divide by {2 * BLOCK} and D={dim} by {DEFAULT.tile_k}"


def fused_router(x_td, w_hi_de, w_lo_de, bias_e, spec: RouterSpec, *, with_logits=False,
                 tiling=None) -> KernelOut:
  """The kernel. Selection on the logits for softmax (monotone: the same top-k as on the
  probabilities) and on sigmoid(logits) + bias_e for sigmoid; ties to the lower expert id."""
  num_tokens, dim = x_td.shape
  num_experts, top_k = w_hi_de.shape[1], spec.top_k
  t = tiling or select_tiling(num_tokens, dim, num_experts, top_k, x_td.dtype)
  if t is None:
    why = why_not(num_tokens, dim, num_experts, top_k, x_td.dtype)
    raise ValueError(f"kernels_pallas.route backend='gpu': {why}; use backend='split'.")
  pl, plgpu = _compat.mgpu()
  rows, tk = BLOCK, t.tile_k
  cta_rows = 2 * rows
  num_tiles = num_tokens // cta_rows
  num_sms = _compat.num_sms()
  k_steps, stages = dim // tk, t.stages
  parts = -(-num_sms // rows) * rows   # statistics rows: whole 64-row tiles for expert_order
  sigmoid = spec.scoring == "sigmoid"
  has_bias = sigmoid and bias_e is not None   # else no operand: a zero bias would be a kernel
  x_tf = _compat.swizzle_transforms(tk, x_td.dtype)
  w_tf = _compat.swizzle_transforms(num_experts, w_hi_de.dtype)
  f32_tf = _compat.swizzle_transforms(num_experts, jnp.float32)
  shape, shape_k = (rows, num_experts), (rows, top_k)
  wgmma = plgpu.Layout.WGMMA
  per_row = lambda v, s=shape: lax.broadcast_in_dim(v, s, [0])   # ([:, None] does not lower)
  row_sum = lambda a: jnp.sum(a, axis=1)
  const = lambda v, dt, s=shape: plgpu.layout_cast(jnp.full(s, v, dt), wgmma)
  EPI, TMA = 2, 3   # warpgroups 0 and 1 multiply, 2 runs the epilogue, 3 issues the loads

  def select(logits, bias_smem):
    """Top-k of one block's [rows, E] logits: ids and weights as [rows, k] arrays, the pick
    matrix, the normalised probabilities and logsumexp."""
    col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=wgmma)
    col_k = plgpu.broadcasted_iota(jnp.int32, shape_k, 1, layout=wgmma)
    top = jnp.max(logits, axis=1)
    ex = jnp.exp(logits - per_row(top))
    total = row_sum(ex)
    lse = top + jnp.log(total)
    if sigmoid:
      scores = 1.0 / (1.0 + jnp.exp(-logits))
      probs = scores * per_row(1.0 / row_sum(scores))
      sel = scores
      if has_bias:
        bias = plgpu.load(bias_smem, (), layout=wgmma.reduce(0))
        sel = sel + lax.broadcast_in_dim(bias, shape, [1])
    else:
      probs = ex * per_row(1.0 / total)
      sel = logits
    key = selection_keys(sel, col)
    taken = jnp.int32(jnp.iinfo(jnp.int32).min)   # no real key: its bits are a NaN's
    ids = const(0, jnp.int32, shape_k)
    picked = []
    for j in range(top_k):
      best = jnp.max(key, axis=1)
      hit = key == per_row(best)
      ids = jnp.where(col_k == j, per_row(key_expert(best), shape_k), ids)
      if sigmoid:   # the pick's exact, unbiased score
        picked.append(row_sum(jnp.where(hit, scores, 0.0)))
      else:
        picked.append(jnp.exp(jnp.max(jnp.where(hit, logits, -jnp.inf), axis=1) - top) / total)
      key = jnp.where(hit, taken, key)
    denom = None
    if spec.renormalize:
      denom = functools.reduce(lambda a, b: a + b, picked) + spec.eps
      if not sigmoid:
        denom = jnp.maximum(denom, jnp.finfo(jnp.float32).eps)
    weights = const(0.0, jnp.float32, shape_k)
    for j in range(top_k):
      w_j = (picked[j] if denom is None else picked[j] / denom) * spec.scale
      weights = jnp.where(col_k == j, per_row(w_j, shape_k), weights)
    return ids, weights, key == taken, probs, lse

  def body(x_gmem, w_hi_gmem, w_lo_gmem, *refs):
    bias_gmem, refs = (refs[0], refs[1:]) if has_bias else (None, refs)
    experts_gmem, weights_gmem, upto_gmem, stats_gmem = refs[:4]
    logits_gmem = refs[4] if with_logits else None
    bf16_tf = _compat.swizzle_transforms(num_experts, jnp.bfloat16)

    @functools.partial(
        pl.run_scoped, collective_axes="wg",
        x_ring=plgpu.SMEM((stages, cta_rows, tk), x_td.dtype, transforms=x_tf),
        w_ring=plgpu.SMEM((stages, 2, tk, num_experts), w_hi_de.dtype, transforms=w_tf),
        full=plgpu.Barrier(num_arrivals=3, num_barriers=stages),    # x, w_hi, w_lo have landed
        empty=plgpu.Barrier(num_arrivals=2, num_barriers=stages),   # both MMA warpgroups read
        l_smem=plgpu.SMEM((2, rows, num_experts), jnp.float32, transforms=f32_tf),
        l_full=plgpu.Barrier(num_arrivals=1, num_barriers=2),       # a block's logits written
        l_free=plgpu.Barrier(num_arrivals=1, num_barriers=2),       # ... and read again
        h_smem=plgpu.SMEM(shape, jnp.bfloat16, transforms=bf16_tf),
        ids_smem=plgpu.SMEM(shape_k, jnp.int32), w_smem=plgpu.SMEM(shape_k, jnp.float32),
        ps_smem=plgpu.SMEM(shape, jnp.float32, transforms=f32_tf),
        lsq_smem=plgpu.SMEM((rows,), jnp.float32), st_smem=plgpu.SMEM((3, rows), jnp.float32),
        b_smem=plgpu.SMEM((num_experts,), jnp.float32), bar=plgpu.Barrier(num_arrivals=1))
    def _scope(x_ring, w_ring, full, empty, l_smem, l_full, l_free, h_smem, ids_smem, w_smem,
               ps_smem, lsq_smem, st_smem, b_smem, bar):
      wg = lax.axis_index("wg")
      sm = lax.axis_index("sm")
      block_rows = lambda tile, c: pl.ds(pl.multiple_of(tile * cta_rows + c * rows, rows), rows)

      @pl.when(wg == TMA)
      def _loads():
        plgpu.set_max_registers(40, action="decrease")

        @plgpu.nd_loop((num_tiles,), collective_axes="sm")
        def _tiles(info):
          tile = info.index[0]

          @pl.loop(0, k_steps)
          def _steps(kk):
            step = info.local_index * k_steps + kk
            slot = lax.rem(step, stages)

            @pl.when(step >= stages)
            def _reuse():
              plgpu.barrier_wait(empty.at[slot])

            plgpu.copy_gmem_to_smem(
                x_gmem.at[pl.ds(tile * cta_rows, cta_rows), pl.ds(kk * tk, tk)],
                x_ring.at[slot], full.at[slot])
            for half, w_gmem in enumerate((w_hi_gmem, w_lo_gmem)):
              plgpu.copy_gmem_to_smem(w_gmem.at[pl.ds(kk * tk, tk)], w_ring.at[slot, half],
                                      full.at[slot])

      @pl.when(wg < EPI)
      def _multiply():
        plgpu.set_max_registers(t.mma_registers, action="decrease")

        @plgpu.nd_loop((num_tiles,), collective_axes="sm")
        def _tiles(info):
          tile = info.index[0]

          def k_loop(acc_ref):
            @pl.loop(0, k_steps)
            def _steps(kk):
              slot = lax.rem(info.local_index * k_steps + kk, stages)
              plgpu.barrier_wait(full.at[slot])
              a = x_ring.at[slot].at[pl.ds(pl.multiple_of(wg * rows, rows), rows)]
              plgpu.wgmma(acc_ref, a, w_ring.at[slot, 0])
              if t.lo_product:
                plgpu.wgmma(acc_ref, a, w_ring.at[slot, 1])
              plgpu.wgmma_wait(0)
              plgpu.barrier_arrive(empty.at[slot])
            return acc_ref[...]

          with jax.named_scope("main"):
            logits = pl.run_scoped(k_loop, plgpu.ACC(shape, jnp.float32))

          @pl.when(info.local_index > 0)
          def _wait_free():   # the epilogue warpgroup has read the previous block
            plgpu.barrier_wait(l_free.at[wg])

          if with_logits:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          l_smem[wg] = logits
          plgpu.commit_smem()
          if with_logits:
            plgpu.copy_smem_to_gmem(l_smem.at[wg], logits_gmem.at[block_rows(tile, wg)])
          plgpu.barrier_arrive(l_full.at[wg])

        if with_logits:
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)

      @pl.when(wg == EPI)
      def _epilogue():
        plgpu.set_max_registers(t.epilogue_registers, action="increase")
        if has_bias:
          plgpu.copy_gmem_to_smem(bias_gmem, b_smem, bar)
          plgpu.barrier_wait(bar)
        ps_smem[...] = const(0.0, jnp.float32)
        lsq_smem[...] = plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), wgmma.reduce(1))

        @plgpu.nd_loop((num_tiles,), collective_axes="sm")
        def _tiles(info):
          for c in range(2):
            plgpu.barrier_wait(l_full.at[c])
            logits = plgpu.load(l_smem.at[c], (), layout=wgmma)
            plgpu.barrier_arrive(l_free.at[c])
            if t.skip_select:
              continue
            my_rows = block_rows(info.index[0], c)
            with jax.named_scope("epilogue"):
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # last block's stores have read
              ids, weights, hits, probs, lse = select(logits, b_smem)
              ps_smem[...] = plgpu.load(ps_smem, (), layout=wgmma) + probs
              lsq_smem[...] = plgpu.load(lsq_smem, (), layout=wgmma.reduce(1)) + lse * lse
              ids_smem[...] = ids
              w_smem[...] = weights
              h_smem[...] = jnp.where(hits, 1.0, 0.0).astype(jnp.bfloat16)
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(ids_smem, experts_gmem.at[my_rows])
              plgpu.copy_smem_to_gmem(w_smem, weights_gmem.at[my_rows])
              row = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=wgmma)
              col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=wgmma)
              lower = (row >= col).astype(jnp.bfloat16)   # L[i, j] = 1 for j <= i

              def prefix(acc_ref):
                plgpu.wgmma(acc_ref, lower, h_smem)
                plgpu.wgmma_wait(0)
                return acc_ref[...]

              upto = pl.run_scoped(prefix, plgpu.ACC(shape, jnp.float32))
              h_smem[...] = upto.astype(jnp.bfloat16)   # the wgmma has read H
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(h_smem, upto_gmem.at[my_rows])

        # this CTA's partials: the probabilities summed over rows here, lse^2 per row; the
        # first CTAs also zero the padding rows (P - num_sms < 64 <= num_sms)
        st_smem[0] = jnp.sum(plgpu.load(ps_smem, (), layout=wgmma), axis=0)
        st_smem[1] = plgpu.load(lsq_smem, (), layout=wgmma.reduce(1))
        st_smem[2] = plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), wgmma.reduce(1))
        plgpu.commit_smem()
        for i in range(2):
          plgpu.copy_smem_to_gmem(st_smem.at[i], stats_gmem.at[i, sm])

          @pl.when(sm + num_sms < parts)
          def _pad():
            plgpu.copy_smem_to_gmem(st_smem.at[2], stats_gmem.at[i, sm + num_sms])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  out_type = [jax.ShapeDtypeStruct((num_tokens, top_k), jnp.int32),
              jax.ShapeDtypeStruct((num_tokens, top_k), jnp.float32),
              jax.ShapeDtypeStruct((num_tokens, num_experts), jnp.bfloat16),
              jax.ShapeDtypeStruct((2, parts, rows), jnp.float32)]   # rows == E
  if with_logits:
    out_type.append(jax.ShapeDtypeStruct((num_tokens, num_experts), jnp.float32))
  trace = dict(profile_space=t.profile_space, profile_dir=t.profile_dir) if t.profile_space else {}
  kernel = _compat.mgpu_kernel(
      body, out_type=tuple(out_type), grid=(num_sms,), grid_names=("sm",),
      num_threads=4, thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup, **trace))
  bias = (bias_e.astype(jnp.float32),) if has_bias else ()
  outs = kernel(x_td, w_hi_de, w_lo_de, *bias)
  experts, weights, upto, stats = outs[:4]
  return KernelOut(experts, weights, upto, stats, outs[4] if with_logits else None)


def weights_from_logits(logits_te, experts_tk, spec: RouterSpec):
  """The kernel's combine weights in jnp: its contract, and its backward by autodiff."""
  return combine_weights(scores_and_probs(logits_te, spec)[0], experts_tk, spec)


def fused_router_reference(x_td, w_hi_de, w_lo_de, bias_e, spec: RouterSpec, *,
                           with_logits=False, tiling=None) -> KernelOut:
  """The kernel's contract in jnp (CPU tests of the code around it, GPU tests of the kernel).
  Its statistics come as one partial row (the kernel's are per CTA)."""
  del tiling
  num_tokens, num_experts = x_td.shape[0], w_hi_de.shape[1]
  logits_te = (jnp.dot(x_td, w_hi_de, preferred_element_type=jnp.float32)
               + jnp.dot(x_td, w_lo_de, preferred_element_type=jnp.float32))
  sigmoid = spec.scoring == "sigmoid"
  sel_te = jax.nn.sigmoid(logits_te) if sigmoid else logits_te
  if sigmoid and bias_e is not None:
    sel_te = sel_te + bias_e.astype(jnp.float32)
  keys, _ = lax.top_k(selection_keys(sel_te, jnp.arange(num_experts, dtype=jnp.int32)), spec.top_k)
  experts_tk = key_expert(keys)
  weights_tk = weights_from_logits(logits_te, experts_tk, spec)
  picked_bte = (experts_tk[:, :, None] == jnp.arange(num_experts)).any(1).reshape(
      -1, BLOCK, num_experts).astype(jnp.float32)
  upto_te = jnp.cumsum(picked_bte, axis=1).reshape(num_tokens, num_experts)
  lse_t = jax.nn.logsumexp(logits_te, axis=-1)
  sums_2e = jnp.stack([jnp.sum(scores_and_probs(logits_te, spec)[1], axis=0),
                       jnp.full((num_experts,), jnp.sum(lse_t ** 2) / num_experts)])
  stats_spe = jnp.zeros((2, BLOCK, num_experts), jnp.float32).at[:, 0].set(sums_2e)
  return KernelOut(experts_tk, weights_tk, upto_te.astype(jnp.bfloat16), stats_spe,
                   logits_te if with_logits else None)


def _kernel(x_td, w_gate_de, bias_e, spec, with_logits):
  return fused_router(x_td, *split.split_bf16(w_gate_de), bias_e, spec, with_logits=with_logits)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(x_td, w_gate_de, bias_e, spec):
  """(weights, mean probability per expert, z-loss, experts, expert order, its inverse, group
  sizes, expert fractions): the two kernels. Without a gradient the first skips the logits."""
  return _with_order(_kernel(x_td, w_gate_de, bias_e, spec, False))


def _with_order(out: KernelOut):
  sort_idx_m, place_m, sizes_e, frac_e, mean_prob_e, z_loss = expert_order(
      out.experts_tk, out.upto_te, out.stats_spe)
  return (out.weights_tk, mean_prob_e, z_loss, out.experts_tk, sort_idx_m, place_m, sizes_e,
          frac_e)


def _fused_fwd(x_td, w_gate_de, bias_e, spec):
  out = _kernel(x_td, w_gate_de, bias_e, spec, True)
  return _with_order(out), (x_td, w_gate_de, bias_e, out.logits_te, out.experts_tk)


def _fused_bwd(spec, res, ct):
  x_td, w_gate_de, bias_e, logits_te, experts_tk = res

  def differentiable_outputs(lg):   # what the kernel computes from the logits, in jnp
    return (weights_from_logits(lg, experts_tk, spec),
            jnp.mean(scores_and_probs(lg, spec)[1], axis=0),
            jnp.mean(jax.nn.logsumexp(lg, axis=-1) ** 2))

  _, vjp = jax.vjp(differentiable_outputs, logits_te)
  (dl_te,) = vjp(tuple(ct[:3]))
  dx_td, dw_de = split.logits_grads(x_td, w_gate_de, dl_te)
  return dx_td, dw_de, None if bias_e is None else jnp.zeros_like(bias_e)


_fused.defvjp(_fused_fwd, _fused_bwd)


def route_gpu(x_td, w_gate_de, bias_e, spec: RouterSpec) -> Routing:
  """The fused kernel, then expert_order: two kernels."""
  weights_tk, mean_prob_e, z_loss, experts_tk, sort_idx_m, slot_pos_m, sizes_e, frac_e = _fused(
      x_td, w_gate_de, bias_e if spec.scoring == "sigmoid" else None, spec)
  return Routing(weights_tk, experts_tk, sort_idx_m, slot_pos_m, sizes_e, frac_e, mean_prob_e,
                 z_loss)

"""Fused router on Hopper in Mosaic GPU: logits, top-k and combine weights in one read of x.

One CTA = 2 compute warpgroups + 1 TMA warpgroup over a persistent grid of row tiles. Each
warpgroup accumulates its rows' logits with two bf16 wgmmas per step into one fp32
accumulator, x @ w_hi + x @ w_lo (w_gate split as in split.py; bf16 x times a bf16 part is
exact in fp32, so the sum is the fp32 logits to ~2^-16 relative). The epilogue, in
registers: the scores, top-k (k rounds of a row max, lowest id among ties) and the
renormalised weights. Two outputs: the logits (the backward's residual, and the input of
the statistics) and one f32 [2k, T] array of per-token results. Column sums are left to XLA:
Mosaic's cross-warp reductions share one scratch buffer between the two warpgroups (seen on
the H100: both warpgroups got one's sums).
"""
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import _compat
from kernels_pallas.router import split
from kernels_pallas.router.reference import (RouterSpec, Routing, combine_weights, expert_order,
                                             inverse_permutation, scores_and_probs)


@dataclasses.dataclass(frozen=True)
class Tiling:
  rows: int = 64       # rows per compute warpgroup (the CTA tile is 2x this); 64 keeps the
                       # epilogue's [rows, E] f32 arrays at 32 registers each for E = 64
  tile_k: int = 64     # contraction step (64 bf16 = one 128-byte swizzle row)
  stages: int = 4      # TMA pipeline depth
  lo_product: bool = True    # DEBUG ONLY when False (logits lose w's low bits): times the MMAs
  skip_select: bool = False  # DEBUG ONLY (wrong picks): times the epilogue's top-k


# E = 64 (A13B) only. At E = 192 (Hy3) the epilogue's [64, E] f32 arrays spill past the
# register file: the top-k made that kernel 2.2x slower (0.41 -> 0.89 ms on the H100).
DEFAULT = Tiling()


class KernelOut(NamedTuple):
  logits_te: jax.Array     # f32 [T, E]
  picks_ct: jax.Array      # f32 [2k, T]: rows [0, k) the expert ids (exact in f32), rows
                           # [k, 2k) their renormalised, scaled combine weights. Token-major
                           # [T, 2k] would save XLA's transposes, but the column stores into
                           # shared memory do not lower in jax 0.11.2 (non-contiguous swizzle)


def select_tiling(num_tokens, dim, num_experts, x_dtype):
  """The tiling for these shapes, or None where the kernel does not apply (pure Python)."""
  t = DEFAULT
  if (jnp.dtype(x_dtype) != jnp.bfloat16 or num_experts != 64 or num_tokens % (2 * t.rows)
      or dim % t.tile_k):
    return None
  return t


def why_not(num_tokens, dim, num_experts, x_dtype):
  if jnp.dtype(x_dtype) != jnp.bfloat16:
    return f"x is {jnp.dtype(x_dtype)}; the fused GPU router takes bf16 activations"
  if num_experts != 64:
    return f"E={num_experts}; the fused GPU router is tiled for E = 64"
  return f"T={num_tokens} must divide by the {2 * DEFAULT.rows}-row tile and D={dim} by 64"


def fused_router(x_td, w_hi_de, w_lo_de, bias_e, spec: RouterSpec, *, tiling=None) -> KernelOut:
  """The kernel. Selection on the logits for softmax (monotone: the same top-k as on the
  probabilities) and on sigmoid(logits) + bias_e for sigmoid; ties to the lower expert id."""
  num_tokens, dim = x_td.shape
  num_experts = w_hi_de.shape[1]
  t = tiling or select_tiling(num_tokens, dim, num_experts, x_td.dtype)
  if t is None:
    why = why_not(num_tokens, dim, num_experts, x_td.dtype)
    raise ValueError(f"kernels_pallas.route backend='gpu': {why}; use backend='split'.")
  pl, plgpu = _compat.mgpu()
  rows, tk, top_k = t.rows, t.tile_k, spec.top_k
  cta_rows = 2 * rows
  num_tiles = num_tokens // cta_rows
  sigmoid = spec.scoring == "sigmoid"
  has_bias = sigmoid and bias_e is not None
  bias_e = (bias_e if has_bias else jnp.zeros((num_experts,))).astype(jnp.float32)
  x_tf = _compat.swizzle_transforms(tk, x_td.dtype)
  w_cat = jnp.concatenate([w_hi_de, w_lo_de], axis=1)   # one operand: one TMA descriptor
  w_tf = _compat.swizzle_transforms(2 * num_experts, w_cat.dtype)
  shape = (rows, num_experts)
  per_row = lambda v: lax.broadcast_in_dim(v, shape, [0])   # ([:, None] does not lower)
  row_sum = lambda a: jnp.sum(a, axis=1)

  def pipeline(body, ctx):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(dim // tk,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
        max_concurrent_steps=t.stages, compute_context=ctx,
        in_specs=[plgpu.BlockSpec((cta_rows, tk), lambda kk: (0, kk), transforms=x_tf),
                  plgpu.BlockSpec((tk, 2 * num_experts), lambda kk: (kk, 0), transforms=w_tf)])

  ignore = lambda *_, **__: None

  def epilogue(logits, bias_smem, picks_smem):
    """Top-k ids and weights of one warpgroup's [rows, E] logits, into picks_smem [2k, rows]."""
    iota = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
    iota = iota.astype(jnp.float32)
    if sigmoid:
      scores = 1.0 / (1.0 + jnp.exp(-logits))
      sel = scores
      if has_bias:
        bias = plgpu.load(bias_smem, (), layout=plgpu.Layout.WGMMA.reduce(0))
        sel = sel + lax.broadcast_in_dim(bias, shape, [1])
    else:   # probabilities of the picks from their logits: exp(l - max) / sum
      top = jnp.max(logits, axis=1)
      total = row_sum(jnp.exp(logits - per_row(top)))
      sel = logits
    picked = []
    for j in range(top_k):
      best = per_row(jnp.max(sel, axis=1))
      first = jnp.min(jnp.where(sel == best, iota, float(num_experts)), axis=1)
      hit = iota == per_row(first)
      picks_smem[j] = first
      if sigmoid:   # the unbiased score of the pick
        picked.append(row_sum(jnp.where(hit, scores, 0.0)))
      else:
        picked.append(jnp.exp(jnp.max(jnp.where(hit, logits, -jnp.inf), axis=1) - top) / total)
      sel = jnp.where(hit, -jnp.inf, sel)
    denom = None
    if spec.renormalize:
      denom = functools.reduce(lambda a, b: a + b, picked) + spec.eps
      if not sigmoid:
        denom = jnp.maximum(denom, jnp.finfo(jnp.float32).eps)
    for j, score in enumerate(picked):
      picks_smem[top_k + j] = (score if denom is None else score / denom) * spec.scale

  def body(x_gmem, w_gmem, bias_gmem, logits_gmem, picks_gmem):
    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(x_gmem.at[pl.ds(0, cta_rows)], w_gmem),
        l_smem=plgpu.SMEM((2, rows, num_experts), jnp.float32,
                          transforms=_compat.swizzle_transforms(num_experts, jnp.float32)),
        p_smem=plgpu.SMEM((2, 2 * top_k, rows), jnp.float32),
        b_smem=plgpu.SMEM((num_experts,), jnp.float32),
        bar=plgpu.Barrier(num_arrivals=1),
        collective_axes="wg")
    def _scope(allocs, l_smem, p_smem, b_smem, bar):
      wg = lax.axis_index("wg")
      if has_bias:
        @pl.when(wg == 0)
        def _load_bias():
          plgpu.copy_gmem_to_smem(bias_gmem, b_smem, bar)
        plgpu.barrier_wait(bar)

      @plgpu.nd_loop((num_tiles,), collective_axes="sm")
      def _items(info):
        row0 = info.index[0] * cta_rows
        my_rows = pl.ds(pl.multiple_of(row0 + wg * rows, rows), rows)

        def ctx(eval_pipeline):
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(shape, jnp.float32))
          def _acc(acc_ref):
            eval_pipeline(acc_ref)
            logits = acc_ref[...]
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # last tile's stores have read
            l_smem[wg] = logits
            if not t.skip_select:
              epilogue(logits, b_smem, p_smem.at[wg])
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(l_smem.at[wg], logits_gmem.at[my_rows])
            plgpu.copy_smem_to_gmem(p_smem.at[wg], picks_gmem.at[:, my_rows])

        def mma(_, x_smem, w_smem, acc_ref):
          a = x_smem.at[pl.ds(pl.multiple_of(wg * rows, rows), rows)]
          plgpu.wgmma(acc_ref, a, w_smem.at[:, pl.ds(0, num_experts)])
          if t.lo_product:
            plgpu.wgmma(acc_ref, a, w_smem.at[:, pl.ds(num_experts, num_experts)])
          plgpu.wgmma_wait(0)
          return acc_ref

        pipeline(mma, ctx)(x_gmem.at[pl.ds(row0, cta_rows)], w_gmem, allocations=allocs)

      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  out_type = KernelOut(jax.ShapeDtypeStruct((num_tokens, num_experts), jnp.float32),
                       jax.ShapeDtypeStruct((2 * top_k, num_tokens), jnp.float32))
  kernel = _compat.mgpu_kernel(
      body, out_type=tuple(out_type), grid=(_compat.num_sms(),), grid_names=("sm",),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  return KernelOut(*kernel(x_td, w_cat, bias_e))


def weights_from_logits(logits_te, experts_tk, spec: RouterSpec):
  """The kernel's combine weights in jnp: its contract, and its backward by autodiff."""
  return combine_weights(scores_and_probs(logits_te, spec)[0], experts_tk, spec)


def fused_router_reference(x_td, w_hi_de, w_lo_de, bias_e, spec: RouterSpec, *,
                           tiling=None) -> KernelOut:
  """The kernel's contract in jnp (CPU tests of the code around it, GPU tests of the kernel)."""
  del tiling
  logits_te = (jnp.dot(x_td, w_hi_de, preferred_element_type=jnp.float32)
               + jnp.dot(x_td, w_lo_de, preferred_element_type=jnp.float32))
  sigmoid = spec.scoring == "sigmoid"
  sel_te = jax.nn.sigmoid(logits_te) if sigmoid else logits_te
  if sigmoid and bias_e is not None:
    sel_te = sel_te + bias_e.astype(jnp.float32)
  _, experts_tk = lax.top_k(sel_te, spec.top_k)
  weights_tk = weights_from_logits(logits_te, experts_tk, spec)
  return KernelOut(logits_te, jnp.concatenate([experts_tk.T.astype(jnp.float32), weights_tk.T]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(x_td, w_gate_de, bias_e, spec):
  return fused_router(x_td, *split.split_bf16(w_gate_de), bias_e, spec)


def _fused_fwd(x_td, w_gate_de, bias_e, spec):
  out = _fused(x_td, w_gate_de, bias_e, spec)
  return out, (x_td, w_gate_de, bias_e, out.logits_te, out.picks_ct[:spec.top_k])


def _fused_bwd(spec, res, ct: KernelOut):
  x_td, w_gate_de, bias_e, logits_te, experts_kt = res
  experts_tk = experts_kt.T.astype(jnp.int32)
  _, vjp = jax.vjp(lambda lg: weights_from_logits(lg, experts_tk, spec), logits_te)
  (dl_te,) = vjp(ct.picks_ct[spec.top_k:].T)
  dx_td, dw_de = split.logits_grads(x_td, w_gate_de, dl_te + ct.logits_te)
  return dx_td, dw_de, None if bias_e is None else jnp.zeros_like(bias_e)


_fused.defvjp(_fused_fwd, _fused_bwd)


def order_from_picks(experts_tk, num_experts):
  """(stable expert order of the flat assignments, group sizes) without a sort.

  An assignment's place is its expert's offset plus the number of earlier tokens that picked
  that expert (a token picks an expert at most once: a cumsum over tokens), then one
  scatter inverts the places.
  """
  picked_te = jnp.any(experts_tk[:, :, None] == jnp.arange(num_experts, dtype=jnp.int32),
                      axis=1).astype(jnp.int32)
  group_sizes_e = jnp.sum(picked_te, axis=0)
  before_te = jnp.cumsum(picked_te, axis=0) - picked_te
  offset_e = jnp.cumsum(group_sizes_e) - group_sizes_e
  place_tk = jnp.take_along_axis(before_te + offset_e, experts_tk, axis=1)
  return inverse_permutation(place_tk.reshape(-1)), group_sizes_e


def route_gpu(x_td, w_gate_de, bias_e, spec: RouterSpec, *, order="cumsum") -> Routing:
  """The fused kernel; then the expert order and the statistics over the logits in XLA."""
  out = _fused(x_td, w_gate_de, bias_e if spec.scoring == "sigmoid" else None, spec)
  num_tokens, num_experts = out.logits_te.shape
  experts_tk = out.picks_ct[:spec.top_k].T.astype(jnp.int32)
  weights_tk = out.picks_ct[spec.top_k:].T
  sort_idx_m, group_sizes_e = order_from_picks(experts_tk, num_experts)
  if order == "sort":   # for the benchmark's comparison
    sort_idx_m = expert_order(experts_tk.reshape(-1), num_experts)
  lse_t = jax.nn.logsumexp(out.logits_te, axis=-1)
  if spec.scoring == "softmax":   # the softmax from the logsumexp: one pass fewer
    probs_te = jnp.exp(out.logits_te - lse_t[:, None])
  else:
    probs_te = scores_and_probs(out.logits_te, spec)[1]
  return Routing(weights_tk, experts_tk, sort_idx_m, group_sizes_e.astype(jnp.int32),
                 group_sizes_e.astype(jnp.float32) / (num_tokens * spec.top_k),
                 jnp.mean(probs_te, axis=0), jnp.mean(lse_t ** 2))

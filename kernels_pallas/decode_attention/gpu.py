"""Decode attention on Hopper in Mosaic GPU: split-KV flash decoding over the cache in place.

One CTA = (split, kv head, batch row). Its TMA warpgroup streams K and V blocks of `block_kv`
rows straight from the stacked cache [L, B, kv, S, D] at a traced layer index, and only the
blocks below the row's length: nothing is sliced or copied first, and one compiled program serves
every length. Its compute warpgroup runs QK with wgmma (the R query rows of the kv head padded to
M = 64, R = 4 for A13B: the padding is compute the memory-bound loop has to spare), an online
softmax in registers, and P.V. Each split writes its unnormalised accumulator and running
max / sum (log2 units); `merge_splits` combines them in fp32.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import _compat
from kernels_pallas.decode_attention.reference import NEG

Q_ROWS = 64          # wgmma M: query rows per CTA
LOG2E = math.log2(math.e)
_FP16 = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class Tiling:
  block_kv: int = 64   # cache rows per pipeline step
  stages: int = 4      # K/V blocks in flight
  splits: int = 0      # splits of each row's length; 0 = enough CTAs for `waves` waves
  waves: int = 1       # H100, 7 layers: 1 wave 2-10% faster than 2 (2K and 16K, batch 1 and 32)

  def smem_bytes(self, d):
    return Q_ROWS * d * 2 + 2 * self.stages * self.block_kv * d * 2 + Q_ROWS * d * 4 + 2 * Q_ROWS * 4


DEFAULT = Tiling()


def why_not(q_shape, cache_shape, dtype, tiling=DEFAULT, cache_dtype=None) -> str:
  """Why the kernel cannot run these shapes and dtypes ('' when it can)."""
  rows, d = q_shape[-2], q_shape[-1]
  s = cache_shape[-2]
  if jnp.dtype(dtype) not in _FP16:
    return f"dtype {dtype}: the kernel takes bf16 or f16"
  if cache_dtype is not None and jnp.dtype(cache_dtype) != jnp.dtype(dtype):
    return f"cache dtype {cache_dtype} differs from the queries' {dtype}"
  if rows > Q_ROWS:
    return f"{rows} query rows per kv head exceed {Q_ROWS}"
  if d % 64 or d > 256:
    return f"head_dim {d} must be a multiple of 64 and at most 256"
  if s % tiling.block_kv:
    return f"cache length {s} must be a multiple of block_kv={tiling.block_kv}"
  return ""


SM_SMEM = 233472     # Hopper: 228 KiB of shared memory per SM, 1 KiB of it reserved per CTA


def num_splits(batch, kv_heads, max_len, d, tiling=DEFAULT):
  """Splits per (row, kv head): `waves` times the CTAs the SMs hold at once."""
  if tiling.splits:
    return tiling.splits
  resident = max(1, SM_SMEM // (tiling.smem_bytes(d) + 1024)) * _compat.num_sms()
  want = -(-tiling.waves * resident // (batch * kv_heads))
  return max(1, min(want, max_len // tiling.block_kv))


def decode_attention_partials(q_bkrd, k_cache, v_cache, lengths_b, layer, tiling=DEFAULT):
  """Per-split (acc [B, kv, P, Rp, D], m, l [B, kv, P, Rp]) with Rp = R rounded up to 4."""
  b, kv, r, d = q_bkrd.shape
  if k_cache.ndim == 4:
    k_cache, v_cache, layer = k_cache[None], v_cache[None], 0
  s_max = k_cache.shape[3]
  why = why_not(q_bkrd.shape, k_cache.shape, q_bkrd.dtype, tiling, k_cache.dtype)
  if why:
    raise ValueError(f"kernels_pallas.decode_attention backend='gpu': {why}; use backend='reference'.")
  dtype = q_bkrd.dtype
  pl, plgpu = _compat.mgpu()
  blk, stages = tiling.block_kv, tiling.stages
  splits = num_splits(b, kv, s_max, d, tiling)
  rp = -(-r // 4) * 4        # 1-D TMA stores need 16-byte rows of fp32 stats
  q = jnp.pad(q_bkrd, ((0, 0), (0, 0), (0, Q_ROWS - r), (0, 0)))
  layer_1 = jnp.asarray(layer, jnp.int32).reshape(1)
  lengths_b = jnp.minimum(lengths_b.astype(jnp.int32), s_max)
  scale = d ** -0.5 * LOG2E
  swz = _compat.swizzle_transforms(64, dtype)

  def kernel(layer_ref, len_ref, q_ref, k_ref, v_ref, acc_out, m_out, l_out, scoped):
    (q_smem, k_smem, v_smem, o_smem, m_smem, l_smem), (q_bar, k_bars, v_bars), (k_free, v_free) = scoped
    split, head, row = lax.axis_index("split"), lax.axis_index("head"), lax.axis_index("batch")
    wg = lax.axis_index("wg")
    length = len_ref[row]
    blocks = lax.div(length + (blk - 1), jnp.int32(blk))
    per = lax.div(blocks + (splits - 1), jnp.int32(splits))
    first = split * per
    steps = jnp.clip(blocks - first, 0, per)

    @pl.when(wg == 0)
    def _compute():
      @pl.when(steps > 0)
      def _load_q():
        plgpu.copy_gmem_to_smem(q_ref.at[row, head], q_smem, q_bar)
        plgpu.barrier_wait(q_bar)

      def step(i, carry):
        acc, m, l = carry
        slot = lax.rem(i, jnp.int32(stages))
        plgpu.barrier_wait(k_bars.at[slot])

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
          return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((Q_ROWS, blk), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        col = plgpu.broadcasted_iota(jnp.int32, (Q_ROWS, blk), 1, layout=plgpu.Layout.WGMMA)
        s = jnp.where(col + (first + i) * blk < length, s * scale, NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        p16 = p.astype(dtype)
        plgpu.barrier_wait(v_bars.at[slot])

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l

      init = (plgpu.layout_cast(jnp.full((Q_ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA),
              plgpu.layout_cast(jnp.full((Q_ROWS,), NEG, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
              plgpu.layout_cast(jnp.full((Q_ROWS,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1)))
      acc, m, l = lax.fori_loop(0, steps, step, init)
      o_smem[...] = acc
      m_smem[...] = m
      l_smem[...] = l
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, rp)], acc_out.at[row, head, split])
      plgpu.copy_smem_to_gmem(m_smem.at[pl.ds(0, rp)], m_out.at[row, head, split])
      plgpu.copy_smem_to_gmem(l_smem.at[pl.ds(0, rp)], l_out.at[row, head, split])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _memory():
      layer = layer_ref[0]

      def fetch(i, slot, wait):
        rows = pl.ds(pl.multiple_of((first + i) * blk, blk), blk)
        if wait:
          plgpu.barrier_wait(k_free.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[layer, row, head, rows], k_smem.at[slot], k_bars.at[slot])
        if wait:
          plgpu.barrier_wait(v_free.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[layer, row, head, rows], v_smem.at[slot], v_bars.at[slot])

      for i in range(stages):
        pl.when(i < steps)(functools.partial(fetch, i, i, False))

      @pl.loop(0, jnp.maximum(steps - stages, 0))
      def _refill(i):
        fetch(i + stages, lax.rem(i, jnp.int32(stages)), True)

  def entry(layer_ref, len_ref, q_ref, k_ref, v_ref, acc_out, m_out, l_out):
    smem = (plgpu.SMEM((Q_ROWS, d), dtype, transforms=swz),
            plgpu.SMEM((stages, blk, d), dtype, transforms=swz),
            plgpu.SMEM((stages, blk, d), dtype, transforms=swz),
            plgpu.SMEM((Q_ROWS, d), jnp.float32),
            plgpu.SMEM((Q_ROWS,), jnp.float32),
            plgpu.SMEM((Q_ROWS,), jnp.float32))
    loaded = (plgpu.Barrier(), plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages))
    freed = (plgpu.Barrier(num_arrivals=1, num_barriers=stages),) * 2
    pl.run_scoped(lambda *scoped: kernel(layer_ref, len_ref, q_ref, k_ref, v_ref, acc_out, m_out,
                                         l_out, scoped),
                  smem, loaded, freed, collective_axes="wg")

  out_type = (jax.ShapeDtypeStruct((b, kv, splits, rp, d), jnp.float32),
              jax.ShapeDtypeStruct((b, kv, splits, rp), jnp.float32),
              jax.ShapeDtypeStruct((b, kv, splits, rp), jnp.float32))
  call = _compat.mgpu_kernel(
      entry, out_type=out_type, grid=(splits, kv, b), grid_names=("split", "head", "batch"),
      num_threads=2, thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True))
  acc, m, l = call(layer_1, lengths_b, q, k_cache, v_cache)
  return acc[:, :, :, :r], m[..., :r], l[..., :r]


def merge_splits(acc, m, l):
  """(acc, m, l) per split (log2 units) -> o [B, kv, R, D] fp32 and lse [B, kv, R] (natural log)."""
  m_max = jnp.max(m, axis=2, keepdims=True)
  w = jnp.exp2(m - m_max)                    # empty splits: m = NEG -> 0
  l_sum = jnp.sum(w * l, axis=2)
  o = jnp.sum(w[..., None] * acc, axis=2) / jnp.maximum(l_sum, 1e-30)[..., None]
  lse = jnp.where(l_sum > 0, (m_max[:, :, 0] + jnp.log2(jnp.maximum(l_sum, 1e-30))) / LOG2E, NEG)
  return o, lse


def decode_attention(q_bkrd, k_cache, v_cache, lengths_b, layer=None, tiling=DEFAULT):
  return merge_splits(*decode_attention_partials(q_bkrd, k_cache, v_cache, lengths_b, layer, tiling))

"""Grouped matmul on TPU in Mosaic TPU (megablox-style), runnable in interpret mode on CPU.

gmm: grid (N tiles, visits, K tiles). A visit is (group, tile-aligned row block) from
`schedule.aligned_schedule`; a block shared by two groups is visited once per group and
each visit writes only its group's rows (a masked select into the output block, which
stays resident in VMEM while consecutive visits hit the same block). The pseudo-group G
covers rows past sum(group_sizes) and writes zeros. fp32 accumulation in a VMEM scratch
over the K axis; the dx form (transpose_rhs) reads w [E, N, K] blocks and contracts
their last dim, so no transposed copy of w is made.

tgmm: grid (K tiles, N tiles, visits); the accumulator spans the visits of one group and
is stored when the next visit's group differs; every group, empty or not, gets a visit,
so empty groups write dw = 0. Rows outside the visit's group are zeroed in both operands
(select, so garbage in an out-of-bounds last block cannot leak as NaN * 0).

Scalar prefetch: group_v, block_v, lo_v, hi_v (int32 [V]) drive the index maps.
f32 operands contract at HIGHEST precision (Mosaic: fp32 contract precision), as the
reference does; interpret mode on a GPU would otherwise use TF32.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import _compat
from kernels_pallas.gmm.reference import precision_for
from kernels_pallas.gmm.schedule import aligned_schedule

ROW_ALIGN = 16       # sublanes of a packed bf16 vreg (8 for 32-bit types)
LANE = 128
TILE_PREFS = (512, 256, 128)
MAX_FULL_DIM = 2048  # a dim that no 128-multiple tile divides is taken whole up to this


def _tile(dim):
  """Lane-dim tile: a 128-multiple dividing dim, or the whole dim (Mosaic takes either)."""
  for t in TILE_PREFS:
    if dim % t == 0:
      return t
  return dim if dim <= MAX_FULL_DIM else None


def select_tiling(m, k, n):
  """(tm, tk, tn) for an [m, k] @ [k, n] grouped matmul, or None when no tiling fits."""
  tk, tn = _tile(k), _tile(n)
  if tk is None or tn is None or m < 1:
    return None
  return (m if m <= 128 else 128), tk, tn   # a block equal to the whole dim is always legal


def supports_all(m, k, n, dtype):
  """Whether gmm at [m, k] x [k, n] and the dx / tgmm forms its custom_vjp calls all tile."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
    return False, f"dtype {dtype}: the TPU kernel takes bf16 or f32 operands"
  if select_tiling(m, k, n) is None or select_tiling(m, n, k) is None:
    return False, f"K={k} and N={n} must each be a multiple of 128 or at most {MAX_FULL_DIM}"
  return True, ""


def supports(x, w, *, transpose_rhs=False, tiling=None):
  m, k = x.shape
  n = w.shape[1] if transpose_rhs else w.shape[2]
  if w.dtype != x.dtype:
    return False, f"dtypes {x.dtype}/{w.dtype} differ"
  if tiling is not None:   # shapes are checked against the given tiling by _check_tiling
    return supports_all(128, 128, 128, x.dtype)
  return supports_all(m, k, n, x.dtype)


def _check_tiling(op, m, k, n, tiling):
  t = tiling or select_tiling(m, k, n)
  if t is None:
    raise ValueError(f"kernels_pallas.{op} backend='tpu': no tiling for M={m}, K={k}, N={n} "
                     f"(K and N must be multiples of 128 or at most {MAX_FULL_DIM}); "
                     "use backend='reference'.")
  tm, tk, tn = t
  if (tm % ROW_ALIGN and tm != m) or k % tk or n % tn:
    raise ValueError(f"kernels_pallas.{op} backend='tpu': tiling {t} needs tm % {ROW_ALIGN} "
                     f"== 0 (or tm == M={m}) and tk, tn dividing K={k}, N={n}.")
  return t


def _row_mask(shape, block, lo, hi, tm):
  rows = lax.broadcasted_iota(jnp.int32, shape, 0) + block * tm
  return (rows >= lo) & (rows < hi)


def gmm(x_mk, w_ekn, group_sizes_e, *, out_dtype=None, transpose_rhs=False, tiling=None,
        interpret=False):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu
  m, k = x_mk.shape
  num_groups = w_ekn.shape[0]
  n = w_ekn.shape[1] if transpose_rhs else w_ekn.shape[2]
  out_dtype = jnp.dtype(out_dtype or x_mk.dtype)
  tm, tk, tn = _check_tiling("gmm", m, k, n, tiling)
  sched = aligned_schedule(group_sizes_e, m, tm, zero_tail=True)
  num_visits, tiles_k = sched.group_v.shape[0], k // tk
  contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))

  def kernel(group_v, block_v, lo_v, hi_v, x_ref, w_ref, o_ref, acc_ref):
    v, kk = pl.program_id(1), pl.program_id(2)
    lo, hi = lo_v[v], hi_v[v]

    @pl.when(kk == 0)
    def _zero():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((group_v[v] < num_groups) & (hi > lo))   # the pseudo-group keeps acc = 0
    def _accumulate():
      acc_ref[...] += lax.dot_general(x_ref[...], w_ref[...], (contract, ((), ())),
                                      precision=precision_for(x_mk.dtype),
                                      preferred_element_type=jnp.float32)

    @pl.when(kk == tiles_k - 1)
    def _store():   # only this visit's group rows; the block's other rows are others' visits
      keep = _row_mask((tm, tn), block_v[v], lo, hi, tm)
      o_ref[...] = jnp.where(keep, acc_ref[...],
                             o_ref[...].astype(jnp.float32)).astype(out_dtype)

  def w_map(ni, v, kk, group_v, block_v, lo_v, hi_v):
    g = jnp.minimum(group_v[v], num_groups - 1)   # pseudo-group: any block, never read
    return (g, ni, kk) if transpose_rhs else (g, kk, ni)

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=(n // tn, num_visits, tiles_k),
      in_specs=[
          pl.BlockSpec((tm, tk), lambda ni, v, kk, g, b, lo, hi: (b[v], kk)),
          pl.BlockSpec((None, tn, tk) if transpose_rhs else (None, tk, tn), w_map),
      ],
      out_specs=pl.BlockSpec((tm, tn), lambda ni, v, kk, g, b, lo, hi: (b[v], ni)),
      scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)])
  call = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), grid_spec=grid_spec,
      compiler_params=_compat.tpu_params(("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      cost_estimate=pl.CostEstimate(
          flops=2 * m * k * n, transcendentals=0,
          bytes_accessed=(x_mk.nbytes * (n // tn) + k * n * w_ekn.dtype.itemsize * num_visits
                          + m * n * out_dtype.itemsize)))
  return call(sched.group_v, sched.start_v // tm, sched.lo_v, sched.hi_v, x_mk, w_ekn)


def tgmm(x_mk, dy_mn, group_sizes_e, *, out_dtype=None, tiling=None, interpret=False):
  """dw[e] = x_e^T @ dy_e -> [E, K, N]."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu
  m, k = x_mk.shape
  n = dy_mn.shape[1]
  num_groups = group_sizes_e.shape[0]
  out_dtype = jnp.dtype(out_dtype or x_mk.dtype)
  tm, tk, tn = _check_tiling("tgmm", m, k, n, tiling)
  sched = aligned_schedule(group_sizes_e, m, tm, visit_empty=True)
  num_visits = sched.group_v.shape[0]
  in_dtype = x_mk.dtype

  def kernel(group_v, block_v, lo_v, hi_v, x_ref, dy_ref, o_ref, acc_ref):
    v = pl.program_id(2)
    g, lo, hi = group_v[v], lo_v[v], hi_v[v]

    @pl.when((v == 0) | (g != group_v[jnp.maximum(v - 1, 0)]))
    def _zero():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(hi > lo)
    def _accumulate():
      x_tk = jnp.where(_row_mask((tm, tk), block_v[v], lo, hi, tm),
                       x_ref[...].astype(jnp.float32), 0.0)
      dy_tn = jnp.where(_row_mask((tm, tn), block_v[v], lo, hi, tm),
                        dy_ref[...].astype(jnp.float32), 0.0)
      # Explicit transpose (as megablox): a transposed-lhs contraction need not lower.
      acc_ref[...] += jnp.dot(x_tk.T.astype(in_dtype), dy_tn.astype(in_dtype),
                              precision=precision_for(in_dtype),
                              preferred_element_type=jnp.float32)

    @pl.when((v == num_visits - 1) | (g != group_v[jnp.minimum(v + 1, num_visits - 1)]))
    def _store():
      o_ref[...] = acc_ref[...].astype(out_dtype)

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=(k // tk, n // tn, num_visits),
      in_specs=[
          pl.BlockSpec((tm, tk), lambda ki, ni, v, g, b, lo, hi: (b[v], ki)),
          pl.BlockSpec((tm, tn), lambda ki, ni, v, g, b, lo, hi: (b[v], ni)),
      ],
      out_specs=pl.BlockSpec((None, tk, tn), lambda ki, ni, v, g, b, lo, hi: (g[v], ki, ni)),
      scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)])
  call = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      grid_spec=grid_spec,
      compiler_params=_compat.tpu_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      cost_estimate=pl.CostEstimate(
          flops=2 * m * k * n, transcendentals=0,
          bytes_accessed=(x_mk.nbytes * (n // tn) + dy_mn.nbytes * (k // tk)
                          + num_groups * k * n * out_dtype.itemsize)))
  return call(sched.group_v, sched.start_v // tm, sched.lo_v, sched.hi_v, x_mk, dy_mn)

"""Grouped matmul on Hopper in Mosaic GPU: warp-specialised wgmma, TMA pipeline, persistent grid.

gmm: one CTA = 2 compute warpgroups + 1 TMA warpgroup. A work item is (row tile of one
group, N tile); the kernel finds an item's tile from `schedule.group_offsets` (each group's
first row and first visit: 2G + 4 numbers), so a tile starts at its group's first row and only a
group's last tile is partial: about G/2 wasted tiles instead of the G-1 of tile-aligned schemes.
Each compute warpgroup owns half of the N tile; partial tiles are stored with a ladder of
power-of-two TMA stores so rows of the next group are never touched; the zero pseudo-group
writes the padded rows past sum(group_sizes). x and the full-tile output buffer have two views
(`_compat.row_aliased`): TMA copies reach any row through a row view, wgmma reads the 8-row
tiled one (through it alone a tile had to start on a multiple of 8 rows, and a lead of up
to 7 rows of the previous group cost 5 of 64 groups one more tile in the bench).

gmm_swiglu: the same kernel with w's N = [gate | up]: each warpgroup takes 64 rows of the CTA
tile and accumulates a gate and an up tile of 128 columns in two accumulators, whose SwiGLU
the epilogue stores (half the output bytes; the [M, 2F] product is never written).

gmv: the same kernel with one visit per row, each row its own expert (one token's top-k at
decode): no sort and no schedule arrays (visit v is row v), so no XLA kernels in front of it.

The persistent loop stops at the visits that hold rows (a traced count): walking the empty
static visits cost ~0.05 ms per batch-1 call. The zero pseudo-group's tiles get a loop of
their own, so every item of the main loop runs the pipeline: with `Tiling.steady` the TMA
warpgroup then runs on into the next item's loads (a pipeline of pipelines).

tgmm: a work item is (group, K tile, N tile); the pipeline runs over the group's rows in
chunks starting at the group's first row; the last chunk's rows past the group are zeroed
in shared memory (dy side, each warpgroup its own half) before the wgmma.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import _compat
from kernels_pallas.gmm.schedule import cdiv, group_bounds, group_offsets, item_of, visit_of


@dataclasses.dataclass(frozen=True)
class Tiling:
  tile_m: int = 128        # rows per tile (both warpgroups)
  tile_n: int = 128        # columns per compute warpgroup (CTA tile is 2x this)
  tile_k: int = 64         # contraction step (64 bf16 = one 128-byte swizzle row)
  stages: int = 4          # TMA pipeline depth
  epi_n: int = 64          # columns per epilogue store (smaller = less shared memory)
  grid_minor: int = 1      # planar_snake minor dim: 1 = N tiles inner (when group_window = 0)
  grid_width: int = 1      # planar_snake tile width
  swizzled_full: bool = True   # full tiles leave through a swizzled buffer (no bank conflicts)
  delay_release: int = 0   # keep this many wgmma groups in flight before releasing a stage
  skip_epilogue: bool = False  # DEBUG ONLY (wrong output): times the main loop alone
  wg_m: bool = False       # split the CTA tile between the warpgroups along M (m64n256 wgmma)
  steady: bool = False     # the TMA warpgroup runs on into the next item (when K steps % stages == 0)
  prefetch: bool = False   # load the next item's schedule entries while this item runs
  half_tail: bool = False  # tiles of at most tile_m/2 rows run a second pipeline copy whose wgmma
                           # covers the top half only (not with wg_m or swiglu)
  group_window: int = 0    # > 0: item order by windows of this many visits inside one group,
                           # schedule.item_of (0: a planar snake over the visits)
  profile_space: int = 0   # DEBUG: trace ranges per warpgroup (in shared memory) for Mosaic's
  profile_dir: str = ""    # in-kernel profiler: "main" / "epilogue" per item (profile_gmm.py)


# Measured on H100 (a13b_up): N-minor order 492 TFLOP/s, M-minor snake of width 8: 688.
# Consecutive CTAs then share one weight slice across 8 N tiles, which stays in L2.
# prefetch: +0.6% at A13B down fwd in three A/B runs, +-0.1% at A13B up (fifteenth session).
# group_window (sixteenth session, device time, bench's imbalanced groups): the planar snake's
# fixed 8-visit windows straddle groups; windows inside one group took fwd A13B up / down
# 709.8 / 700.0 -> 726.9 / 707.6 TFLOP/s at 16 (722.7 / 705.7 at 8), Hy3 +3.5-3.9%, dx +1-5%.
# Seventeenth session: the N direction flips on every other window of a group (item_of),
# +0.3-0.6% at A13B up and down in two A/B runs.
DEFAULT = Tiling(stages=3, grid_minor=0, grid_width=8, prefetch=True, group_window=16)
# Items of at most 32 K steps (Hy3's down projection, K = 1536: 24 steps) spend a larger share in
# the pipeline fill: running the TMA warpgroup on into the next item took Hy3 down fwd 544.7 ->
# 558.9 TFLOP/s (H100, seventeenth session); at 48 steps (A13B down) it was within 0.5%, at 96
# (A13B up dx) 1.3% slower.
# half_tail (eighteenth session, H100, device time, two A/B runs): Hy3 down fwd +2.7-3.1%; with
# 48-64 K steps it cost 1.5-5% (A13B up / down, Hy3 up fwd), the second pipeline copy slowing
# every item, so only here. A 64-row tile everywhere (tile_m=64) was 8-20% slower at all shapes.
SHORT_K = dataclasses.replace(DEFAULT, steady=True, half_tail=True)
SHORT_K_STEPS = 32
# Decode items are few per SM: letting the TMA warpgroup run on into the next item measured
# 0.5-2.5% less device time at batch 1 (0 at batch 32), H100, bench_decode_gmm.py.
DECODE = Tiling(tile_m=64, stages=4, steady=True)
# tgmm's chunks start on 8-row boundaries: its x rows (128 columns) span two swizzle rows, so
# the row view of _compat.row_aliased does not apply there.
ALIGN = 8
# delay_release=1 (the next chunk's wgmma issues before the last one retires) measured within
# the order-of-timing noise (+-3%) of 0 on the H100 at the A13B and Hy3 shapes: not the default.
TGMM_DEFAULT = Tiling(tile_m=128, tile_n=128, tile_k=64, stages=4, epi_n=64)


# N tile of 2 x 64 for N a multiple of 128 but not 256 (e.g. the dx form at K=128). Verified on
# the H100 (test_gpu_narrow_and_short_k, 2026-11-23), so select_tiling may return it.
NARROW = Tiling(tile_m=64, tile_n=64, stages=4)
# Batch-1 decode streams weights with little compute per stage: 8 stages in flight instead of 4
# took the A13B up / down kernels 0.203 / 0.138 -> 0.198 / 0.129 ms of device time (H100 profile,
# 8 one-row groups; 6 stages or 128-wide K steps: within 2% of 8).
NARROW_DEEP = Tiling(tile_m=64, tile_n=64, stages=8, steady=True)
# SwiGLU epilogue: 128-row tiles, each warpgroup 64 rows x 128 outputs (gate + up accumulators).
SWIGLU = Tiling(stages=3, grid_minor=0, grid_width=8, prefetch=True, group_window=16)
MIN_ROWS = DECODE.tile_m  # the public op pads fewer rows up to one tile
NARROW_VERIFIED = True
_FP16 = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# fp8 (e4m3) operands: forward only, w as [E, N, K] (fp8 wgmma reads both operands K-major).
# K steps of 128 (one 128-byte swizzle row). Measured on the H100 (A13B expert shapes, batch-1
# gmv, 8 one-row groups): 2850 / 2750 GB/s for up / down, 97% / 93% of the copy rate, at 4, 6
# or 8 stages alike; grouped at 4096 rows 341 TFLOP/s.
FP8 = jnp.dtype(jnp.float8_e4m3fn)
_OPERANDS = _FP16 + (FP8,)


def _for_dtype(t, dtype):
  """A bf16 tiling's fp8 form: the same K bytes per step (128 elements), decode stages 4."""
  if jnp.dtype(dtype).itemsize != 1:
    return t
  return dataclasses.replace(t, tile_k=128, stages=min(t.stages, 4) if t.tile_m == 64 else t.stages)


def default_tiling(m, k):
  if m <= 1024:
    return DECODE
  return SHORT_K if k // DEFAULT.tile_k <= SHORT_K_STEPS else DEFAULT


def _fits(t, m, k, n):
  if m < t.tile_m:
    return f"M={m} is under the row tile {t.tile_m}"
  if k % t.tile_k or n % (2 * t.tile_n):
    return f"K={k} must divide by {t.tile_k} and N={n} by {2 * t.tile_n}"
  return ""


def select_tiling(m, k, n, dtype):
  """The gmm tiling for y[m, n] = x[m, k] @ w[k, n] (either w layout), or None.

  Pure Python on shapes, so the choice is testable without a GPU.
  """
  if jnp.dtype(dtype) not in _OPERANDS:
    return None
  candidates = (default_tiling(m, k),) + ((NARROW,) if NARROW_VERIFIED else ())
  if m <= NARROW.tile_m:   # batch-1 decode: 8 one-row groups; half-width tiles double the CTAs
    candidates = (NARROW_DEEP, DECODE)   # that stream the weights (192 -> 384 on 132 SMs)
  for t in candidates:
    t = _for_dtype(t, dtype)
    if not _fits(t, m, k, n):
      return t
  return None


def select_tgmm_tiling(m, k, n, dtype):
  """The tgmm tiling for dw[k, n] = x[m, k]^T @ dy[m, n], or None."""
  t = TGMM_DEFAULT
  if jnp.dtype(dtype) not in _FP16 or k % t.tile_m or n % (2 * t.tile_n):
    return None
  return t


def supports_all(m, k, n, dtype):
  """Whether gmm at [m, k] x [k, n] and every form its custom_vjp calls have a tiling.

  The backward reuses the forward's backend: dx is the other orientation ([m, n] x
  [n, k]) and dw a tgmm; auto-dispatch must not pick a backend its backward cannot run.
  """
  for name, ok in (("gmm", select_tiling(m, k, n, dtype)), ("dx", select_tiling(m, n, k, dtype)),
                   ("tgmm", select_tgmm_tiling(m, k, n, dtype)),
                   ("tgmm^T", select_tgmm_tiling(m, n, k, dtype))):
    if ok is None:
      return False, f"no GPU tiling for the {name} form of M={m}, K={k}, N={n}, {dtype}"
  return True, ""


def supports(x, w, *, transpose_rhs=False, tiling=None):
  m, k = x.shape
  n = w.shape[1] if transpose_rhs else w.shape[2]
  if x.dtype not in _OPERANDS or w.dtype != x.dtype:
    return False, f"dtype {x.dtype}/{w.dtype}: the GPU kernel takes bf16, f16 or float8_e4m3fn operands"
  if x.dtype == FP8 and not transpose_rhs:
    return False, "fp8 operands need w as [E, N, K] (transpose_rhs=True): fp8 wgmma reads K-major"
  if tiling is not None:
    why = _fits(tiling, m, k, n)
    return not why, why
  if select_tiling(m, k, n, x.dtype) is None:
    return False, _fits(default_tiling(m, k), m, k, n)
  return True, ""


def _ladder_store(plgpu, pl, src_smem, dst_gmem, rows, max_rows):
  """Store rows [0, rows) of src to dst with power-of-two TMA copies (static shapes).

  The copies form one bulk group, so a wait on store groups counts the ladder once.
  """
  off = 0
  size = 1 << (max_rows.bit_length() - 1)
  while size >= 1:
    @pl.when((rows & size) != 0)
    def _store(off=off, size=size):
      plgpu.copy_smem_to_gmem(src_smem.at[pl.ds(off, size)], dst_gmem.at[pl.ds(off, size)],
                              commit_group=False)
    off = off + (rows & size)
    size //= 2
  plgpu.commit_smem_to_gmem_group()


def _compiler_params(plgpu, t):
  trace = dict(profile_space=t.profile_space, profile_dir=t.profile_dir) if t.profile_space else {}
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup, **trace)


def _tiling_or_raise(op, x_mk, w_ekn, transpose_rhs, tiling):
  ok, why = supports(x_mk, w_ekn, transpose_rhs=transpose_rhs, tiling=tiling)
  if not ok:
    raise ValueError(f"kernels_pallas.{op} backend='gpu': {why}; use backend='reference'.")
  n = w_ekn.shape[1] if transpose_rhs else w_ekn.shape[2]
  return tiling or select_tiling(*x_mk.shape, n, x_mk.dtype)


def gmm(x_mk, w_ekn, group_sizes_e, *, out_dtype=None, transpose_rhs=False, tiling=None,
        interpret=False):
  del interpret
  t = _tiling_or_raise("gmm", x_mk, w_ekn, transpose_rhs, tiling)
  return _grouped_matmul(x_mk, w_ekn, group_sizes_e, t, out_dtype, transpose_rhs)


def swiglu_supports(x, w, tiling=None):
  t = tiling or SWIGLU
  m, k = x.shape
  f = w.shape[2] // 2
  if x.dtype not in _FP16 or w.dtype != x.dtype:
    return False, f"dtype {x.dtype}/{w.dtype}: the GPU kernel takes bf16 or f16 operands"
  if m < t.tile_m or k % t.tile_k or w.shape[2] % 2 or f % t.tile_n:
    return False, (f"M={m} >= {t.tile_m}, K={k} divisible by {t.tile_k} and F={f} (half of "
                   f"w's N) divisible by {t.tile_n} are needed")
  return True, ""


def gmm_swiglu(x_mk, w_ekn, group_sizes_e, *, out_dtype=None, tiling=None, interpret=False):
  """silu(x @ w[e, :, :F]) * (x @ w[e, :, F:]) per group: the gate+up gmm with SwiGLU applied
  to its fp32 accumulators. Each warpgroup takes 64 rows of the CTA tile and accumulates the
  gate and up columns of one 128-wide output tile, so both halves meet in the same registers."""
  del interpret
  ok, why = swiglu_supports(x_mk, w_ekn, tiling)
  if not ok:
    raise ValueError(f"kernels_pallas.gmm_swiglu backend='gpu': {why}; use backend='reference'.")
  return _grouped_matmul(x_mk, w_ekn, group_sizes_e, tiling or SWIGLU, out_dtype, False,
                         swiglu=True)


def _grouped_matmul(x_mk, w_ekn, group_sizes_e, t, out_dtype, transpose_rhs, swiglu=False):
  offsets = group_offsets(group_sizes_e, x_mk.shape[0], t.tile_m)
  return _visit_matmul(x_mk, w_ekn, offsets, t, out_dtype, transpose_rhs, swiglu)


def gmv(x_mk, w_ekn, experts_m, *, out_dtype=None, transpose_rhs=False, tiling=None,
        interpret=False):
  """y[r] = x[r] @ w[experts[r]] for the first len(experts) rows of x, one visit per row.

  x is padded to at least one row tile; rows past len(experts) are left unwritten.
  """
  del interpret
  t = _tiling_or_raise("gmv", x_mk, w_ekn, transpose_rhs, tiling)
  # The visit arrays of one visit per row were 4 iota / broadcast kernels per decode layer
  # (~7 us on the H100): the kernel derives them from the visit index instead.
  return _visit_matmul(x_mk, w_ekn, experts_m.astype(jnp.int32), t, out_dtype, transpose_rhs)


def _visit_matmul(x_mk, w_ekn, visits, t, out_dtype, transpose_rhs, swiglu=False):
  """The kernel: for each visit that holds rows and each N tile.

  visits: `schedule.group_offsets` (int32 [2, G + 2]): the real groups' visits come first, then
  the zero pseudo-group's; or, for gmv, the expert of each row (int32 [M]): visit v writes row v.
  swiglu: w's N holds [gate | up]; the output is silu(gate) * up, N / 2 wide.
  """
  m, k = x_mk.shape
  num_groups = w_ekn.shape[0]
  n = w_ekn.shape[1] if transpose_rhs else w_ekn.shape[2]
  out_dtype = jnp.dtype(out_dtype or x_mk.dtype)
  pl, plgpu = _compat.mgpu()
  tm, tn, tk = t.tile_m, t.tile_n, t.tile_k
  parts = 2 if swiglu else 1       # weight column blocks per K step: (gate, up) or one
  n_out = n // parts
  cta_n = tn if swiglu else 2 * tn   # output columns of a CTA tile
  grid_n = n_out // cta_n
  per_row = visits.ndim == 1
  entries = visits.shape[-1]
  k_iters = k // tk
  slots = min(t.stages, k_iters)   # the pipeline's x buffers; step kk uses slot kk % slots
  # x and the full-tile output buffer: TMA through a row view (a tile starts at any row), wgmma
  # and register stores through the 8-row tiled view of the same bytes (_compat.row_aliased).
  x_tf = _compat.row_transforms(tk, x_mk.dtype)
  w_tf = _compat.swizzle_transforms(tk if transpose_rhs else cta_n, w_ekn.dtype)
  # Partial tiles need row-granular slices of the epilogue buffer: no swizzle there.
  epi_n = min(t.epi_n, tn, 128 // out_dtype.itemsize)
  # Per-warpgroup share of the (tm, cta_n) CTA tile.
  split_m = t.wg_m or swiglu
  wg_rows, wg_cols_n = (tm // 2, cta_n) if split_m else (tm, tn)
  chunks = wg_cols_n // epi_n
  # A pipeline of pipelines must keep its slot sequence across items.
  steady = t.steady and k_iters % t.stages == 0 and t.delay_release == 0

  def pipeline(body, ctx, state=None):
    w_block = (cta_n, tk) if transpose_rhs else (tk, cta_n)
    w_index = (lambda kk: (0, kk)) if transpose_rhs else (lambda kk: (kk, 0))
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_iters,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
        max_concurrent_steps=t.stages, compute_context=ctx, pipeline_state=state,
        in_specs=[
            plgpu.BlockSpec((tm, tk), lambda kk: (0, kk), transforms=x_tf,
                            delay_release=t.delay_release),
        ] + [plgpu.BlockSpec(w_block, w_index, transforms=w_tf, delay_release=t.delay_release)
             for _ in range(parts)])

  ignore = lambda *_, **__: None

  def body(visits_gmem, x_gmem, w_gmem, o_gmem):
    load = lambda r, i: visits_gmem[r, i]
    if per_row:
      computed = held = entries
    else:   # the persistent loops stop at the visits that hold rows
      computed, held = load(1, num_groups), load(1, num_groups + 1)
    fake_x = x_gmem.at[pl.ds(0, tm)]
    fake_w = (w_gmem.at[0, pl.ds(0, cta_n), :] if transpose_rhs
              else w_gmem.at[0, :, pl.ds(0, cta_n)])

    allocs = pipeline(ignore, ignore).get_allocations(fake_x, *[fake_w] * parts)

    @functools.partial(
        pl.run_scoped,
        allocs=_compat.with_row_view_input(allocs, x_mk.dtype),
        o_smem=plgpu.SMEM((2, wg_rows, epi_n), out_dtype),
        o_swz=_compat.row_aliased((2, wg_rows, epi_n), out_dtype) if t.swizzled_full else None,
        collective_axes="wg")
    def _scope(allocs, o_smem, o_swz):
      wg = lax.axis_index("wg")
      allocs, x_tiled = _compat.split_row_view_input(allocs)

      def item(ni, row0, rows):
        """The visit's first row, and the epilogue that stores its N tile ni."""
        r0 = wg * wg_rows if split_m else 0
        c0 = ni * cta_n + (0 if split_m else wg * tn)
        wg_cols = pl.ds(pl.multiple_of(c0, tn), wg_cols_n)

        def epilogue(acc):
          if t.skip_epilogue:
            return
          wg_end = jnp.clip(rows - r0, 0, wg_rows)
          full = wg_end == wg_rows
          for c in range(chunks):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # buffers free again
            part = acc[:, c * epi_n:(c + 1) * epi_n]
            dst = o_gmem.at[pl.ds(row0 + r0, wg_rows), wg_cols].at[:, pl.ds(c * epi_n, epi_n)]
            # Index the buffers, never slice their rows: a row slice measured ~8% slower.
            plain = o_smem.at[wg]

            def partial(part=part, dst=dst, plain=plain):
              plain[...] = part
              plgpu.commit_smem()
              _ladder_store(plgpu, pl, plain, dst, wg_end, wg_rows)

            if not t.swizzled_full:
              partial()
              continue

            @pl.when(full)
            def _full(part=part, dst=dst):
              o_rows, o_tiled = o_swz
              o_tiled.at[wg][...] = part
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(o_rows.at[wg], dst)

            pl.when(~full)(partial)

        return row0, epilogue

      def schedule(lin):
        """Item lin's N tile, expert and visit (scalar loads from global memory)."""
        if t.group_window and not per_row:
          return item_of(lin, load, entries, grid_n, t.group_window, tm)
        v, ni = plgpu.planar_snake(lin, (computed, grid_n), t.grid_minor, t.grid_width)
        if per_row:
          return ni, visits_gmem[v], v, jnp.int32(1)
        return (ni,) + visit_of(v, load, entries, tm)

      def run_item(info, sched):
        ni, g, *rest = sched
        row0, epilogue = item(ni, *rest)
        short = rest[1] <= tm // 2   # rows: a group's last tile, half empty or more
        g = jnp.minimum(g, num_groups - 1)
        w_cta = [w_gmem.at[g, pl.ds(ni * cta_n, cta_n), :] if transpose_rhs
                 else w_gmem.at[g, :, pl.ds(p * n_out + ni * cta_n, cta_n)] for p in range(parts)]
        state = None
        if steady:   # the first item fills the pipeline; the TMA warpgroup never drains it
          state = jnp.where(info.local_index == 0, plgpu.PipelinePipeline.START,
                            plgpu.PipelinePipeline.STEADY).astype(jnp.int32)

        def ctx(eval_pipeline):
          acc = plgpu.ACC((wg_rows, wg_cols_n), jnp.float32)

          @functools.partial(pl.run_scoped, acc_refs=[acc] * parts)
          def _acc(acc_refs):
            with jax.named_scope("main"):
              eval_pipeline(acc_refs)
            with jax.named_scope("epilogue"):
              if swiglu:
                gate, up = acc_refs[0][...], acc_refs[1][...]
                epilogue((gate * up / (1.0 + jnp.exp(-gate))).astype(out_dtype))
              else:
                epilogue(acc_refs[0][...].astype(out_dtype))

        def mma(idx, _, *w_smems_and_accs, top_only=False):
          *w_smems, acc_refs = w_smems_and_accs
          x_smem = x_tiled.at[idx[0] % slots]   # the slot the pipeline loaded (row view)
          for w_smem, acc_ref in zip(w_smems, acc_refs):
            if split_m:
              a = x_smem.at[pl.ds(pl.multiple_of(wg * wg_rows, wg_rows), wg_rows)]
              b = plgpu.transpose_ref(w_smem, (1, 0)) if transpose_rhs else w_smem
            else:
              a = x_smem
              half = pl.ds(pl.multiple_of(wg * tn, tn), tn)
              b = (plgpu.transpose_ref(w_smem.at[half, :], (1, 0)) if transpose_rhs
                   else w_smem.at[:, half])
            if top_only:
              top = pl.ds(0, tm // 2)
              acc_ref, a = acc_ref.at[top], a.at[top]
            plgpu.wgmma(acc_ref, a, b)
          plgpu.wgmma_wait(t.delay_release)
          return acc_refs

        def launch(body):
          pipeline(body, ctx, state)(x_gmem.at[pl.ds(row0, tm)], *w_cta, allocations=allocs)

        if t.half_tail and not split_m:
          pl.when(short)(lambda: launch(functools.partial(mma, top_only=True)))
          pl.when(~short)(lambda: launch(mma))
        else:
          launch(mma)

      total = computed * grid_n
      if t.prefetch:   # the loads' latency hides behind the current item's pipeline
        clamp = lambda lin: schedule(jnp.clip(lin, 0, jnp.maximum(total - 1, 0)))

        @plgpu.nd_loop((total,), collective_axes="sm", init_carry=clamp(lax.axis_index("sm")))
        def _items(info, carry):
          nxt = clamp(info.index[0] + lax.axis_size("sm"))
          run_item(info, carry)
          return nxt
      else:
        @plgpu.nd_loop((total,), collective_axes="sm")
        def _items(info):
          run_item(info, schedule(info.index[0]))

      def zero_item(info):   # padded rows past sum(group_sizes)
        _, start, rows = visit_of(computed + info.index[0] // grid_n, load, entries, tm)
        _, epilogue = item(info.index[0] % grid_n, start, rows)

        @pl.when(wg < 2)
        def _zeros():
          epilogue(plgpu.layout_cast(jnp.zeros((wg_rows, wg_cols_n), out_dtype),
                                     plgpu.Layout.WGMMA))

      if not per_row:   # gmv leaves rows past its visits unwritten
        plgpu.nd_loop(((held - computed) * grid_n,), collective_axes="sm")(zero_item)

      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = _compat.mgpu_kernel(
      body, out_type=jax.ShapeDtypeStruct((m, n_out), out_dtype),
      grid=(_compat.num_sms(),), grid_names=("sm",), num_threads=3, thread_name="wg",
      compiler_params=_compiler_params(plgpu, t))
  return kernel(visits, x_mk, w_ekn)


def tgmm(x_mk, dy_mn, group_sizes_e, *, out_dtype=None, tiling=None, interpret=False):
  """dw[e] = x_e^T @ dy_e: work item (group, K tile, N tile); pipeline over the group's rows."""
  del interpret
  m, k = x_mk.shape
  n = dy_mn.shape[1]
  num_groups = group_sizes_e.shape[0]
  out_dtype = jnp.dtype(out_dtype or x_mk.dtype)
  t = tiling or TGMM_DEFAULT
  tko, tn, chunk = t.tile_m, t.tile_n, t.tile_k   # out rows (K), out cols per WG, rows/step
  cta_n = 2 * tn
  if x_mk.dtype not in (jnp.bfloat16, jnp.float16) or dy_mn.dtype != x_mk.dtype:
    raise ValueError("kernels_pallas.tgmm backend='gpu' takes bf16/f16 x and dy of one dtype; "
                     "use backend='reference'.")
  if k % tko or n % cta_n:
    raise ValueError(f"kernels_pallas.tgmm backend='gpu': K={k} must divide by {tko} and "
                     f"N={n} by {cta_n}; use backend='reference'.")
  pl, plgpu = _compat.mgpu()
  starts, ends = group_bounds(group_sizes_e, m)
  sizes = ends - starts
  first = starts // ALIGN * ALIGN            # chunk starts on 8-row boundaries
  leads = starts - first                     # leading rows of the previous group
  # A pipeline that keeps wgmma groups in flight (delay_release) needs more steps than that: a
  # short group gets all-masked extra steps (one-step pipelines failed to launch on the H100).
  steps = jnp.maximum(cdiv(sizes + leads, chunk), 1 + t.delay_release)
  grid_k, grid_n = k // tko, n // cta_n
  x_tf = _compat.swizzle_transforms(tko, x_mk.dtype)
  dy_tf = _compat.swizzle_transforms(cta_n, dy_mn.dtype)
  o_tf = _compat.swizzle_transforms(t.epi_n, out_dtype)
  epi_n = min(t.epi_n, tn)

  def pipeline(body, ctx, num_steps):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(num_steps,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
        max_concurrent_steps=t.stages, compute_context=ctx,
        in_specs=[
            plgpu.BlockSpec((chunk, tko), lambda r: (r, 0), transforms=x_tf,
                            delay_release=t.delay_release),
            plgpu.BlockSpec((chunk, cta_n), lambda r: (r, 0), transforms=dy_tf,
                            delay_release=t.delay_release),
        ])

  ignore = lambda *_, **__: None

  def body(start_gmem, lead_gmem, size_gmem, steps_gmem, x_gmem, dy_gmem, o_gmem):
    fake_x = x_gmem.at[:, pl.ds(0, tko)]
    fake_dy = dy_gmem.at[:, pl.ds(0, cta_n)]

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore, 8).get_allocations(fake_x, fake_dy),
        o_smem=plgpu.SMEM((2, tko, epi_n), out_dtype, transforms=o_tf),
        collective_axes="wg")
    def _scope(allocs, o_smem):
      wg = lax.axis_index("wg")

      @plgpu.nd_loop((num_groups * grid_k * grid_n,), collective_axes="sm")
      def _items(info):
        lin = info.index[0]
        g = lin // (grid_k * grid_n)
        ki, ni = plgpu.planar_snake(lin % (grid_k * grid_n), (grid_k, grid_n), t.grid_minor,
                                    t.grid_width)
        row0 = pl.multiple_of(start_gmem[g], ALIGN)
        lead, size, nsteps = lead_gmem[g], size_gmem[g], steps_gmem[g]
        dst = o_gmem.at[g, pl.ds(pl.multiple_of(ki * tko, tko), tko),
                        pl.ds(pl.multiple_of(ni * cta_n + wg * tn, tn), tn)]

        def epilogue(acc):
          for c in range(tn // epi_n):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            o_smem[wg] = acc[:, c * epi_n:(c + 1) * epi_n]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[wg], dst.at[:, pl.ds(c * epi_n, epi_n)])

        def ctx(eval_pipeline):
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tko, tn), jnp.float32))
          def _acc(acc_ref):
            with jax.named_scope("main"):
              eval_pipeline(acc_ref)
            with jax.named_scope("epilogue"):
              epilogue(acc_ref[...].astype(out_dtype))

        def mma(idx, x_smem, dy_smem, acc_ref):
          dy_half = dy_smem.at[:, pl.ds(pl.multiple_of(wg * tn, tn), tn)]
          base = idx[0] * chunk
          edge = ((idx[0] == 0) & (lead > 0)) | ((idx[0] + 1) * chunk > lead + size)

          @pl.when(edge)
          def _mask():   # rows of the neighbouring groups (or past M) in an edge chunk
            rows = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, (chunk, tn), 0),
                                     plgpu.Layout.WGMMA) + base
            keep = (rows >= lead) & (rows < lead + size)
            dy_half[...] = jnp.where(keep, dy_half[...], jnp.zeros_like(dy_half[...]))
            plgpu.commit_smem()

          plgpu.wgmma(acc_ref, plgpu.transpose_ref(x_smem, (1, 0)), dy_half)
          plgpu.wgmma_wait(t.delay_release)
          return acc_ref

        @pl.when(size > 0)
        def _compute():
          pipeline(mma, ctx, nsteps)(x_gmem.at[pl.ds(row0, m), pl.ds(ki * tko, tko)],
                                     dy_gmem.at[pl.ds(row0, m), pl.ds(ni * cta_n, cta_n)],
                                     allocations=allocs)

        @pl.when((size == 0) & (wg < 2))
        def _zeros():
          epilogue(plgpu.layout_cast(jnp.zeros((tko, tn), out_dtype), plgpu.Layout.WGMMA))

      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = _compat.mgpu_kernel(
      body, out_type=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      grid=(_compat.num_sms(),), grid_names=("sm",), num_threads=3, thread_name="wg",
      compiler_params=_compiler_params(plgpu, t))
  return kernel(first, leads, sizes, steps, x_mk, dy_mn)

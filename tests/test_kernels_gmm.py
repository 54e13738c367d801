"""kernels_pallas.gmm / tgmm: every backend against a float64 loop oracle.

CPU by default (reference, and the TPU kernel in interpret mode); the Mosaic GPU kernel
runs under @pytest.mark.gpu and is skipped without a Hopper GPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas as kp
from kernels_pallas import _dispatch

# (M, K, N, group_sizes): empty groups, groups not tile-aligned, padded rows past the end.
CASES = [
    (40, 16, 24, [0, 7, 0, 33]),               # empty first/inner groups, M < tile
    (200, 64, 48, [0, 37, 100, 0, 41]),        # unaligned groups, 22 padded rows
    (300, 32, 128, [150, 150]),                # M not a multiple of the tile, no padding
    (96, 128, 64, [0, 0, 0]),                  # all rows padded: output is zeros
]


def oracle(x_mk, w_ekn, gs, transpose_rhs=False):
  x, w = np.asarray(x_mk, np.float64), np.asarray(w_ekn, np.float64)
  if transpose_rhs:
    w = np.swapaxes(w, 1, 2)
  y = np.zeros((x.shape[0], w.shape[2]))
  s = 0
  for e, g in enumerate(gs):
    y[s:s + g] = x[s:s + g] @ w[e]
    s += g
  return y


def toracle(x_mk, dy_mn, gs):
  x, dy = np.asarray(x_mk, np.float64), np.asarray(dy_mn, np.float64)
  dw = np.zeros((len(gs), x.shape[1], dy.shape[1]))
  s = 0
  for e, g in enumerate(gs):
    dw[e] = x[s:s + g].T @ dy[s:s + g]
    s += g
  return dw


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def assert_close(got, want, tol, what):
  if not np.any(want):   # an all-zero answer must come out exactly zero
    assert not np.any(np.asarray(got, np.float32)), f"{what}: expected all zeros"
  else:
    assert rel_err(got, want) < tol, f"{what}: rel err {rel_err(got, want):.2e}"


def inputs(seed, m, k, n, e, dtype):
  """numpy draws: no per-shape jax.random compiles (they dominated this file's time)."""
  rng = np.random.default_rng(seed)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
  return draw(m, k), draw(e, k, n), draw(m, n)


def check_forms(run, case, dtype, seed):
  """run(x, w, dy, gs) -> (y, dx, dw) with dx = gmm(dy, w^T), dw = tgmm(x, dy): vs oracle."""
  m, k, n, gs = case
  x, w, dy = inputs(seed, m, k, n, len(gs), dtype)
  y, dx, dw = jax.jit(run)(x, w, dy, jnp.asarray(gs, jnp.int32))
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  assert (y.dtype, y.shape, dx.shape, dw.shape) == (dtype, (m, n), (m, k), (len(gs), k, n))
  assert_close(y, oracle(x, w, gs), tol, "gmm")
  assert_close(dx, oracle(dy, w, gs, transpose_rhs=True), tol, "gmm transpose_rhs (dx)")
  assert_close(dw, toracle(x, dy, gs), tol, "tgmm (dw)")
  total = sum(gs)
  assert not np.any(np.asarray(y, np.float32)[total:]), "rows past sum(group_sizes) must be 0"
  assert not np.any(np.asarray(dx, np.float32)[total:]), "dx rows past the groups must be 0"
  for e, g in enumerate(gs):
    if g == 0:
      assert not np.any(np.asarray(dw[e], np.float32)), "empty groups must give dw = 0"


def public_forms(backend):
  """y and its vjp through the public op: the custom_vjp's dx and dw use the same backend."""
  def run(x, w, dy, gs):
    y, vjp = jax.vjp(lambda x, w: kp.gmm(x, w, gs, backend=backend), x, w)
    return (y, *vjp(dy))
  return run


@pytest.mark.parametrize("case,dtype", [(c, jnp.float32) for c in CASES]
                         + [(CASES[1], jnp.bfloat16)],
                         ids=["m40-f32", "m200-f32", "m300-f32", "allpad-f32", "m200-bf16"])
def test_reference_matches_oracle(case, dtype):
  check_forms(public_forms("reference"), case, dtype, seed=case[0])


@pytest.mark.parametrize("case,dtype", [(CASES[0], jnp.float32), (CASES[1], jnp.float32),
                                        (CASES[1], jnp.bfloat16), (CASES[3], jnp.float32)],
                         ids=["m40-f32", "m200-f32", "m200-bf16", "allpad-f32"])
def test_tpu_kernel_interpret(case, dtype):
  check_forms(public_forms("tpu_interpret"), case, dtype, seed=7 + case[0])


def test_tpu_kernel_small_tiles():
  """tm=16: most row blocks are shared by two groups or hold empty-group boundaries."""
  from kernels_pallas.gmm import tpu
  case = (120, 32, 16, [5, 0, 17, 33, 0, 0, 2, 40])   # 23 padded rows, last block partial

  def run(x, w, dy, gs):
    return (tpu.gmm(x, w, gs, tiling=(16, 32, 16), interpret=True),
            tpu.gmm(dy, w, gs, transpose_rhs=True, tiling=(16, 16, 32), interpret=True),
            tpu.tgmm(x, dy, gs, tiling=(16, 32, 16), interpret=True))
  check_forms(run, case, jnp.float32, seed=8)


@pytest.mark.parametrize("width", [1, 5, 16])
def test_item_order_visits_every_item_once(width):
  """The GPU gmm's schedule from `group_offsets` alone: each (visit, N tile) exactly once, with the
  visit's rows as in `group_start_schedule`; windows of at most `width` visits of one group from
  the group's first visit, in visit order; each window one N tile at a time (a snake over its
  visits); a group's next window starts on the N tile the last one ended."""
  from kernels_pallas.gmm.schedule import group_offsets, group_start_schedule, item_of, visit_of
  rng = np.random.default_rng(width)
  sizes = rng.multinomial(3000, rng.dirichlet(np.ones(12))).astype(np.int32)
  sizes[3] = 0
  m, tm, grid_n = 3200, 128, 5
  offsets = group_offsets(jnp.asarray(sizes), m, tm)
  load = lambda r, i: offsets[r, i]
  entries = offsets.shape[1]
  computed, held = int(offsets[1, 12]), int(offsets[1, 13])
  sched = group_start_schedule(jnp.asarray(sizes), m, tm, zero_tail=True)
  v_all = jnp.arange(held)
  g_v, start_v, rows_v = (np.asarray(a) for a in jax.vmap(lambda v: visit_of(v, load, entries, tm))(v_all))
  np.testing.assert_array_equal(g_v, np.asarray(sched.group_v)[:held])
  np.testing.assert_array_equal(start_v, np.asarray(sched.start_v)[:held])
  np.testing.assert_array_equal(rows_v, np.asarray(sched.rows_v)[:held])
  assert (g_v[:computed] < 12).all() and (g_v[computed:] == 12).all()
  lin = jnp.arange(computed * grid_n)
  ni, g, start, _ = (np.asarray(a) for a in
                     jax.vmap(lambda i: item_of(i, load, entries, grid_n, width, tm))(lin))
  v = np.asarray(offsets[1])[g] + (start - np.asarray(offsets[0])[g]) // tm
  assert sorted(zip(v.tolist(), ni.tolist())) == [(a, b) for a in range(computed)
                                                  for b in range(grid_n)]
  group = g_v
  windows, first = [], 0      # the oracle: each group's visits in runs of `width`
  for u in range(1, computed + 1):
    if u == computed or group[u] != group[first]:
      windows += [(s, min(width, u - s)) for s in range(first, u, width)]
      first = u
  pos = 0
  for s, c in windows:
    items = slice(pos, pos + c * grid_n)
    cols, rows = ni[items].reshape(grid_n, c), v[items].reshape(grid_n, c)
    assert (cols == cols[:, :1]).all() and sorted(cols[:, 0]) == list(range(grid_n))
    assert all(sorted(r) == list(range(s, s + c)) for r in rows)
    assert (rows[1:, 0] == rows[:-1, -1]).all()     # the snake turns on the visit it ended on
    if pos and group[v[pos - 1]] == group[s]:
      assert ni[pos] == ni[pos - 1]                 # a group's windows meet on one N tile
    pos += c * grid_n


@pytest.mark.parametrize("m,tm,sizes", [(200, 16, [0, 37, 100, 0, 41]), (96, 32, [0, 0, 0]),
                                        (64, 16, [16, 0, 16, 32]), (50, 16, [60, 3]),
                                        (130, 16, [3, 0, 1, 0, 0, 9, 70, 1, 0, 20])])
def test_aligned_schedule_covers_each_row_once(m, tm, sizes):
  from kernels_pallas.gmm.schedule import aligned_schedule
  gs = jnp.asarray(sizes, jnp.int32)
  ends = np.minimum(np.cumsum(sizes), m)
  for zero_tail, visit_empty in ((True, False), (False, True)):
    sched = jax.jit(lambda gs: aligned_schedule(gs, m, tm, zero_tail=zero_tail,
                                                visit_empty=visit_empty))(gs)
    s = [np.asarray(a) for a in sched]
    g, start, rows, lo, hi = s
    assert len(g) == -(-m // tm) + len(sizes) - 1 + zero_tail
    assert np.all(start % tm == 0) and np.all(np.diff(start) >= 0) and np.all(np.diff(g) >= 0)
    cover = np.zeros(m, int)
    for v in range(len(g)):
      r = np.arange(start[v], min(start[v] + tm, m))
      mine = r[(r >= lo[v]) & (r < hi[v])]
      assert len(mine) == rows[v]
      cover[mine] += 1
      if g[v] < len(sizes) and rows[v]:
        assert lo[v] == (ends[g[v] - 1] if g[v] else 0) and hi[v] == ends[g[v]]
    want = np.ones(m, int) if zero_tail else (np.arange(m) < ends[-1]).astype(int)
    np.testing.assert_array_equal(cover, want)
    if visit_empty:   # tgmm writes every group's dw, so every group has a visit
      assert set(range(len(sizes))) <= set(g.tolist())


def test_check_grads_second_order():
  from jax.test_util import check_grads
  gs = jnp.asarray([3, 0, 9])
  x, w, _ = inputs(5, 16, 8, 8, 3, jnp.float32)
  # jit: check_grads re-evaluates each function at several points; compile each once.
  # Order 2 differentiates the vjp (x, w, ct) -> (gmm(ct, w^T), tgmm(x, ct)), so it also
  # checks tgmm's own custom_vjp.
  check_grads(jax.jit(lambda x, w: kp.gmm(x, w, gs)), (x, w), order=2, modes=["rev"],
              atol=2e-2, rtol=2e-2)


def test_under_scan_with_traced_group_sizes():
  x, w, _ = inputs(9, 64, 16, 16, 4, jnp.float32)
  gs_lg = jnp.asarray([[10, 0, 20, 30], [0, 64, 0, 0], [1, 2, 3, 4]], jnp.int32)

  @jax.jit
  def run(x, w, gs_lg):
    def body(c, gs):
      return c, kp.gmm(x, w, gs, backend="reference")
    return jax.lax.scan(body, 0, gs_lg)[1]
  ys = run(x, w, gs_lg)
  for i, gs in enumerate(np.asarray(gs_lg)):
    assert rel_err(ys[i], oracle(x, w, gs)) < 1e-5


def test_env_var_forces_backend(monkeypatch):
  monkeypatch.setenv("KERNELS_PALLAS_BACKEND", "gmm=nonsense")
  x, w, _ = inputs(0, 8, 8, 8, 2, jnp.float32)
  with pytest.raises(ValueError, match="unknown backend"):
    kp.gmm(x, w, jnp.asarray([4, 4]))


def test_gpu_tiling_selection():
  """Pure-Python shape logic: which shapes the Mosaic GPU kernel takes (no GPU needed)."""
  from kernels_pallas.gmm import gpu
  bf16 = jnp.bfloat16
  assert gpu.select_tiling(384, 128, 256, bf16) == gpu.DECODE   # K/tile_k = 2 < stages
  assert gpu.select_tiling(65536, 4096, 6144, bf16) == gpu.DEFAULT
  assert gpu.select_tiling(65536, 1536, 4096, bf16) == gpu.SHORT_K   # 24 K steps (Hy3 down)
  assert gpu.select_tiling(40, 128, 256, bf16) is None           # M under the row tile
  assert gpu.select_tiling(4096, 128, 256, jnp.float32) is None
  assert gpu.select_tiling(4096, 96, 256, bf16) is None          # K not a multiple of 64
  # N = 128 (the dx form of K = 128) gets the narrow tiling, verified on the H100.
  assert gpu.NARROW_VERIFIED and gpu.select_tiling(384, 256, 128, bf16) == gpu.NARROW
  assert gpu.select_tiling(64, 4096, 6144, bf16) == gpu.NARROW_DEEP   # one tile of rows: decode b1
  for m, k, n in [(65536, 4096, 6144), (65536, 3072, 4096), (65536, 4096, 3072),
                  (65536, 1536, 4096), (256, 4096, 6144)]:   # the A13B and Hy3 shapes
    assert gpu.supports_all(m, k, n, bf16) == (True, "")
  ok, why = gpu.supports_all(4096, 64, 256, bf16)   # K = 64: the dx form's N' has no tiling
  assert not ok and "dx" in why
  ok, why = gpu.supports_all(4096, 128, 256, bf16)  # dx tiles NARROW, tgmm^T does not
  assert not ok and "tgmm" in why
  assert not gpu.supports_all(4096, 256, 384, bf16)[0]   # tgmm needs N % 256


def test_forced_gpu_on_untileable_shape_names_the_fix():
  x, w, _ = inputs(1, 384, 256, 64, 4, jnp.bfloat16)   # N = 64: no GPU tiling
  with pytest.raises(ValueError, match="backend='reference'"):
    kp.gmm(x, w, jnp.asarray([1, 2, 3, 4]), backend="gpu")


GPU_CASES = [
    (1000, 256, 256, [0, 100, 0, 257, 383, 0, 200, 0]),    # 60 padded rows, empty groups
    (2048, 512, 512, [2048] + [0] * 7),
    (384, 256, 256, [1, 2, 3, 5, 8, 13, 21, 34]),          # tiny groups (decode tiling)
]


@pytest.mark.gpu
@pytest.mark.skipif(not _dispatch.is_hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_kernel(case):
  check_forms(public_forms("gpu"), case, jnp.bfloat16, seed=11 + case[0])


@pytest.mark.gpu
@pytest.mark.skipif(not _dispatch.is_hopper(), reason="needs a Hopper GPU")
def test_gpu_narrow_and_short_k():
  """K = 128 (2 k-steps, fewer than the pipeline's stages) and the N = 128 NARROW tiling.

  Passed on the H100 (2026-11-23), hence gpu.NARROW_VERIFIED = True.
  """
  from kernels_pallas.gmm import gpu
  m, k, n, gs = 384, 128, 256, [1, 2, 3, 5, 8, 13, 21, 34]
  x, w, dy = inputs(21, m, k, n, len(gs), jnp.bfloat16)
  gs_a = jnp.asarray(gs, jnp.int32)
  y = jax.jit(lambda x, w: gpu.gmm(x, w, gs_a))(x, w)
  assert_close(y, oracle(x, w, gs), 1e-2, "gmm K=128")
  dx = jax.jit(lambda dy, w: gpu.gmm(dy, w, gs_a, transpose_rhs=True, tiling=gpu.NARROW))(dy, w)
  assert_close(dx, oracle(dy, w, gs, transpose_rhs=True), 1e-2, "dx N=128 NARROW")
  y = jax.jit(lambda x, w: gpu.gmm(x, w, gs_a, tiling=gpu.NARROW))(x, w)
  assert_close(y, oracle(x, w, gs), 1e-2, "gmm NARROW")
  assert not np.any(np.asarray(dx, np.float32)[sum(gs):])


@pytest.mark.gpu
@pytest.mark.skipif(not _dispatch.is_hopper(), reason="needs a Hopper GPU")
def test_gpu_fewer_rows_than_a_tile():
  """Batch-1 decode: 8 rows (top-8 of one token) are padded to one tile by the public op."""
  m, k, n, gs = 8, 256, 256, [3, 0, 5, 0]
  x, w, _ = inputs(31, m, k, n, len(gs), jnp.bfloat16)
  y = jax.jit(lambda x, w: kp.gmm(x, w, jnp.asarray(gs, jnp.int32), backend="gpu"))(x, w)
  assert y.shape == (m, n)
  assert_close(y, oracle(x, w, gs), 1e-2, "gmm M=8")


@pytest.mark.gpu
@pytest.mark.skipif(not _dispatch.is_hopper(), reason="needs a Hopper GPU")
def test_gpu_grads_match_reference():
  m, k, n, gs = GPU_CASES[0]
  x, w, c = inputs(12, m, k, n, len(gs), jnp.bfloat16)
  grads = {}
  for b in ("gpu", "reference"):
    loss = lambda x, w: jnp.sum(kp.gmm(x, w, jnp.asarray(gs), backend=b).astype(jnp.float32) * c)
    grads[b] = jax.jit(jax.grad(loss, (0, 1)))(x, w)
  for a, r in zip(grads["gpu"], grads["reference"]):
    assert rel_err(a, r) < 1e-2


def test_public_op_pads_fewer_rows_than_a_tile(monkeypatch):
  """The row padding for M < one tile (used by the GPU kernel), exercised on the TPU interpreter."""
  from kernels_pallas.gmm import tpu
  monkeypatch.setattr(tpu, "MIN_ROWS", 32, raising=False)
  m, k, n, gs = 6, 128, 128, [2, 0, 3, 0]   # one padded row past sum(gs) as well
  x, w, c = inputs(41, m, k, n, len(gs), jnp.float32)
  gs_a = jnp.asarray(gs, jnp.int32)

  def loss(x, w, backend):
    return jnp.sum(kp.gmm(x, w, gs_a, backend=backend) * c)

  got = jax.jit(jax.value_and_grad(lambda x, w: loss(x, w, "tpu_interpret"), (0, 1)))(x, w)
  want = jax.value_and_grad(lambda x, w: loss(x, w, "reference"), (0, 1))(x, w)
  assert kp.gmm(x, w, gs_a, backend="tpu_interpret").shape == (m, n)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def gmv_oracle(x_mk, w_ekn, experts, transpose_rhs=False):
  x, w = np.asarray(x_mk, np.float64), np.asarray(w_ekn, np.float64)
  w = np.swapaxes(w, 1, 2) if transpose_rhs else w
  return np.stack([x[r] @ w[e] for r, e in enumerate(experts)])


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmv_reference_matches_oracle_and_plain_grads(transpose_rhs):
  """gmv: each row against its own expert (a repeated expert too), forward and gradients."""
  m, k, n, e = 5, 16, 24, 6
  experts = jnp.asarray([4, 0, 5, 0, 2], jnp.int32)
  x, w, c = inputs(51, m, k, n, e, jnp.float32)
  if transpose_rhs:
    w = jnp.swapaxes(w, 1, 2)
  y = kp.gmv(x, w, experts, transpose_rhs=transpose_rhs, backend="reference")
  assert_close(y, gmv_oracle(x, w, experts, transpose_rhs), 1e-6, "gmv")

  def plain(x, w):
    w_m = jnp.swapaxes(w, 1, 2)[experts] if transpose_rhs else w[experts]
    return jnp.sum(jnp.einsum("mk,mkn->mn", x, w_m, precision="highest") * c)

  ours = lambda x, w: jnp.sum(kp.gmv(x, w, experts, transpose_rhs=transpose_rhs,
                                     backend="reference") * c)
  for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_gpu_kernels_lower_for_cuda_on_cpu(monkeypatch):
  """The Mosaic GPU gmm/gmv/tgmm lower to CUDA here, without a GPU (catches lowering errors)."""
  from kernels_pallas import _compat
  from kernels_pallas.gmm import gpu
  monkeypatch.setattr(_compat, "num_sms", lambda: 132)
  bf = jnp.bfloat16
  spec = lambda *s, dt=bf: jax.ShapeDtypeStruct(s, dt)
  cases = [(lambda x, w, g: gpu.gmm(x, w, g), spec(512, 256), spec(4, 256, 512), spec(4, dt=jnp.int32)),
           (lambda x, w, g: gpu.gmm(x, w, g, transpose_rhs=True), spec(512, 256), spec(4, 512, 256),
            spec(4, dt=jnp.int32)),
           (lambda x, w, g: gpu.gmm(x, w, g, out_dtype=jnp.float32), spec(512, 256),
            spec(4, 256, 512), spec(4, dt=jnp.int32)),
           (lambda x, w, ex: kp.gmv(x, w, ex, backend="gpu"), spec(8, 256), spec(64, 256, 512),
            spec(8, dt=jnp.int32)),
           (lambda x, dy, g: gpu.tgmm(x, dy, g), spec(512, 256), spec(512, 256), spec(4, dt=jnp.int32)),
           (lambda x, w, g: gpu.gmm_swiglu(x, w, g), spec(512, 256), spec(4, 256, 512),
            spec(4, dt=jnp.int32))]
  for t in VARIANT_TILINGS[1:]:
    cases.append((lambda x, w, g, t=t: gpu.gmm(x, w, g, tiling=t), spec(512, 768),
                  spec(4, 768, 512), spec(4, dt=jnp.int32)))
  for fn, *args in cases:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def _variant_tilings():
  from kernels_pallas.gmm import gpu
  d = gpu.DEFAULT
  return [d, dataclasses.replace(d, steady=True), dataclasses.replace(d, swizzled_full=False),
          dataclasses.replace(d, prefetch=False), dataclasses.replace(d, group_window=0),
          dataclasses.replace(d, steady=True, half_tail=True)]


VARIANT_TILINGS = _variant_tilings()


@pytest.mark.gpu
@pytest.mark.skipif(not _dispatch.is_hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("tiling", VARIANT_TILINGS, ids=["default", "steady", "plain_epilogue", "no_prefetch",
                                                        "planar_snake", "steady_half_tail"])
def test_gpu_tiling_variants(tiling):
  """128-row tiles: partial last tiles, groups starting off the 8-row grid, empty groups, padded
  rows; K = 768 (12 steps: a steady pipeline at 3 stages)."""
  from kernels_pallas.gmm import gpu
  m, k, n = 2048, 768, 512
  gs = [0, 70, 129, 1, 300, 64, 65, 500, 0, 37]   # 882 padded rows
  x, w, dy = inputs(71, m, k, n, len(gs), jnp.bfloat16)
  gs_a = jnp.asarray(gs, jnp.int32)
  y = jax.jit(lambda x, w: gpu.gmm(x, w, gs_a, tiling=tiling))(x, w)
  assert_close(y, oracle(x, w, gs), 1e-2, "gmm")
  dx = jax.jit(lambda dy, w: gpu.gmm(dy, w, gs_a, transpose_rhs=True, tiling=tiling))(dy, w)
  assert_close(dx, oracle(dy, w, gs, transpose_rhs=True), 1e-2, "dx")
  for out in (y, dx):
    assert not np.any(np.asarray(out, np.float32)[sum(gs):]), "padded rows must be 0"


@pytest.mark.gpu
@pytest.mark.skipif(not _dispatch.is_hopper(), reason="needs a Hopper GPU")
def test_gpu_f32_output():
  """fp32 outputs: the full-tile store's 128-byte rows hold 32 columns (epi_n 32), tiles at any row."""
  from kernels_pallas.gmm import gpu
  m, k, n = 1024, 256, 512
  gs = [0, 70, 129, 1, 300, 65, 0, 37]   # 422 padded rows
  x, w, _ = inputs(72, m, k, n, len(gs), jnp.bfloat16)
  y = jax.jit(lambda x, w: gpu.gmm(x, w, jnp.asarray(gs, jnp.int32), out_dtype=jnp.float32))(x, w)
  assert y.dtype == jnp.float32
  assert_close(y, oracle(x, w, gs), 1e-5, "gmm fp32 out")   # fp32 accumulation, no bf16 rounding
  assert not np.any(np.asarray(y)[sum(gs):]), "padded rows must be 0"


@pytest.mark.gpu
@pytest.mark.skipif(not _dispatch.is_hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("m,transpose_rhs", [(8, False), (1, False), (8, True)])
def test_gpu_gmv(m, transpose_rhs):
  """Batch-1 decode: one token's top-k rows, each against its own expert, on the kernel.

  K = 512: 8 steps, so NARROW_DEEP's 8-stage pipeline runs steady (across items)."""
  k, n, e = 512, 512, 64
  experts = np.random.default_rng(m).choice(e, m, replace=False)
  x, w, _ = inputs(61 + m, m, k, n, e, jnp.bfloat16)
  if transpose_rhs:
    w = jnp.swapaxes(w, 1, 2)
  y = jax.jit(lambda x, w: kp.gmv(x, w, jnp.asarray(experts, jnp.int32),
                                  transpose_rhs=transpose_rhs, backend="gpu"))(x, w)
  assert y.shape == (m, n)
  assert_close(y, gmv_oracle(x, w, experts, transpose_rhs), 1e-2, f"gmv m={m}")


def swiglu_oracle(x_mk, w_ekn, gs):
  h = oracle(x_mk, w_ekn, gs)
  f = h.shape[1] // 2
  return h[:, :f] / (1.0 + np.exp(-h[:, :f])) * h[:, f:]


@pytest.mark.parametrize("case", CASES[:3])
def test_gmm_swiglu_reference(case):
  """silu(gate) * up of [gate | up]: forward vs the float64 oracle (padded rows 0), and its
  gradients (the backward recomputes h with gmm) vs autodiff of gmm followed by SwiGLU."""
  m, k, n, gs = case
  x, w, _ = inputs(81, m, k, n, len(gs), jnp.float32)
  gs_a = jnp.asarray(gs, jnp.int32)
  y = kp.gmm_swiglu(x, w, gs_a, backend="reference")
  assert y.shape == (m, n // 2)
  assert_close(y, swiglu_oracle(x, w, gs), 1e-5, "gmm_swiglu")
  assert not np.any(np.asarray(y)[sum(gs):]), "padded rows must be 0"

  c = jnp.asarray(np.random.default_rng(3).standard_normal((m, n // 2)), jnp.float32)
  fused = lambda x, w: jnp.sum(kp.gmm_swiglu(x, w, gs_a, backend="reference") * c)

  def plain(x, w):
    h = kp.gmm(x, w, gs_a, backend="reference")
    return jnp.sum(jax.nn.silu(h[:, :n // 2]) * h[:, n // 2:] * c)

  for a, b in zip(jax.grad(fused, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_gmm_swiglu_rejects_odd_n():
  with pytest.raises(ValueError, match="odd"):
    kp.gmm_swiglu(jnp.zeros((8, 4)), jnp.zeros((2, 4, 5)), jnp.array([4, 4]))


@pytest.mark.gpu
@pytest.mark.skipif(not _dispatch.is_hopper(), reason="needs a Hopper GPU")
def test_gpu_gmm_swiglu():
  """The SwiGLU epilogue on the kernel: partial tiles, off-grid and empty groups, padded rows;
  and the public op's gradients on the GPU backend against the reference backend's."""
  from kernels_pallas.gmm import gpu
  m, k, n = 2048, 768, 512
  gs = [0, 70, 129, 1, 300, 64, 65, 500, 0, 37]   # 882 padded rows
  x, w, _ = inputs(91, m, k, n, len(gs), jnp.bfloat16)
  gs_a = jnp.asarray(gs, jnp.int32)
  y = jax.jit(lambda x, w: gpu.gmm_swiglu(x, w, gs_a))(x, w)
  assert y.shape == (m, n // 2)
  assert_close(y, swiglu_oracle(x, w, gs), 1e-2, "gmm_swiglu")
  assert not np.any(np.asarray(y, np.float32)[sum(gs):]), "padded rows must be 0"
  c = jnp.asarray(np.random.default_rng(5).standard_normal((m, n // 2)), jnp.bfloat16)
  loss = lambda b: jax.jit(jax.grad(
      lambda x, w: jnp.sum(kp.gmm_swiglu(x, w, gs_a, backend=b).astype(jnp.float32) * c), (0, 1)))
  for got, want, what in zip(loss("gpu")(x, w), loss("reference")(x, w), ("dx", "dw")):
    assert_close(got, np.asarray(want, np.float64), 2e-2, f"gmm_swiglu {what}")


def fp8_inputs(seed, m, k, n, e):
  """e4m3 x [M, K] and w [E, N, K] (the layout fp8 operands take) of unit-scale draws."""
  x, w, _ = inputs(seed, m, k, n, e, jnp.float32)
  return (x * 16).astype(jnp.float8_e4m3fn), (jnp.swapaxes(w, 1, 2) * 16).astype(jnp.float8_e4m3fn)


def test_fp8_operands_on_the_reference_and_the_tiling_rules():
  """fp8 (serving, forward only): gmm and gmv give the exact products of the e4m3 values in
  fp32; the GPU tiling takes 128-element K steps and only the K-major ([E, N, K]) weight layout."""
  from kernels_pallas.gmm import gpu
  m, k, n, gs = 40, 16, 24, [0, 7, 0, 33]
  x8, w8 = fp8_inputs(90, m, k, n, len(gs))
  y = kp.gmm(x8, w8, jnp.asarray(gs, jnp.int32), transpose_rhs=True, out_dtype=jnp.float32)
  assert_close(y, oracle(x8, w8, gs, transpose_rhs=True), 1e-6, "fp8 gmm")
  experts = np.array([3, 0, 2])
  y = kp.gmv(x8[:3], w8, jnp.asarray(experts, jnp.int32), transpose_rhs=True, out_dtype=jnp.float32)
  assert_close(y, gmv_oracle(x8[:3], w8, experts, transpose_rhs=True), 1e-6, "fp8 gmv")
  fp8 = jnp.float8_e4m3fn
  assert gpu.select_tiling(64, 4096, 6144, fp8).tile_k == 128
  assert gpu.select_tiling(4096, 4096, 6144, fp8).tile_k == 128
  assert gpu.select_tiling(64, 4096, 6144, jnp.bfloat16).tile_k == 64
  assert gpu.select_tiling(64, 4000, 6144, fp8) is None   # K must take whole 128-element steps
  x = jnp.zeros((64, 256), fp8)
  ok, why = gpu.supports(x, jnp.zeros((2, 256, 256), fp8), transpose_rhs=False)
  assert not ok and "transpose_rhs" in why
  assert gpu.supports(x, jnp.zeros((2, 256, 256), fp8), transpose_rhs=True)[0]


@pytest.mark.gpu
@pytest.mark.skipif(not _dispatch.is_hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("m", [8, 300])
def test_gpu_fp8(m):
  """The kernel on e4m3 operands: batch-1 decode rows (gmv, 8 experts) and grouped rows (gmm)."""
  k, n, e = 512, 512, 64
  x8, w8 = fp8_inputs(91 + m, m, k, n, e)
  if m == 8:
    experts = np.random.default_rng(m).choice(e, m, replace=False)
    y = jax.jit(lambda x, w: kp.gmv(x, w, jnp.asarray(experts, jnp.int32), transpose_rhs=True,
                                    out_dtype=jnp.float32, backend="gpu"))(x8, w8)
    want = gmv_oracle(x8, w8, experts, transpose_rhs=True)
  else:
    gs = np.bincount(np.random.default_rng(m).integers(0, e, m), minlength=e)
    y = jax.jit(lambda x, w: kp.gmm(x, w, jnp.asarray(gs, jnp.int32), transpose_rhs=True,
                                    out_dtype=jnp.float32, backend="gpu"))(x8, w8)
    want = oracle(x8, w8, gs, transpose_rhs=True)
  # fp32 output; Hopper's fp8 wgmma adds its products in fewer than fp32's bits (the H100
  # probe at K = 4096 showed 5e-3 of the largest output), so 1e-2, not 1e-6.
  assert_close(y, want, 1e-2, f"fp8 m={m}")

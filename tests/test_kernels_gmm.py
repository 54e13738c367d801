"""kernels_pallas.gmm / tgmm: every backend against a float64 loop oracle.

CPU by default (reference, and the TPU kernel in interpret mode); the Mosaic GPU kernel
runs under @pytest.mark.gpu and is skipped without a Hopper GPU.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas as kp

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


def inputs(seed, m, k, n, e, dtype):
  kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
  w = jax.random.normal(kw, (e, k, n), jnp.float32).astype(dtype)
  dy = jax.random.normal(kd, (m, n), jnp.float32).astype(dtype)
  return x, w, dy


def check_backend(backend, case, dtype, seed):
  m, k, n, gs = case
  x, w, dy = inputs(seed, m, k, n, len(gs), dtype)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  gs_a = jnp.asarray(gs, jnp.int32)
  y = kp.gmm(x, w, gs_a, backend=backend)
  assert y.dtype == dtype and y.shape == (m, n)
  assert rel_err(y, oracle(x, w, gs)) < tol or sum(gs) == 0
  assert not np.any(np.asarray(y, np.float32)[sum(gs):]), "rows past sum(group_sizes) must be 0"
  yt = kp.gmm(dy, w, gs_a, transpose_rhs=True, backend=backend)   # the dx form
  assert yt.shape == (m, k)
  assert rel_err(yt, oracle(dy, w, gs, transpose_rhs=True)) < tol or sum(gs) == 0
  dw = kp.tgmm(x, dy, gs_a, backend=backend)
  assert dw.shape == (len(gs), k, n)
  ref = toracle(x, dy, gs)
  assert rel_err(dw, ref) < tol or not ref.any()
  for e, g in enumerate(gs):
    if g == 0:
      assert not np.any(np.asarray(dw[e], np.float32)), "empty groups must give dw = 0"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reference_matches_oracle(case, dtype):
  check_backend("reference", case, dtype, seed=hash((case[0], str(dtype))) % 1000)


@pytest.mark.parametrize("case", CASES[:3])
def test_tpu_kernel_interpret(case):
  pytest.importorskip("kernels_pallas.gmm.tpu", reason="TPU gmm kernel not written yet (issue 3)")
  check_backend("tpu_interpret", case, jnp.float32, seed=7 + case[0])


def test_grads_match_oracle():
  m, k, n, gs = CASES[1]
  x, w, _ = inputs(3, m, k, n, len(gs), jnp.float32)
  c = jax.random.normal(jax.random.key(4), (m, n))
  loss = lambda x, w: jnp.sum(kp.gmm(x, w, jnp.asarray(gs), backend="reference") * c)
  dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w)
  c64 = np.asarray(c, np.float64)
  mask = np.arange(m) < sum(gs)
  assert rel_err(dx, oracle(c64, w, gs, transpose_rhs=True)) < 1e-5
  assert rel_err(dw, toracle(x, c64 * mask[:, None], gs)) < 1e-5


def test_check_grads_second_order():
  from jax.test_util import check_grads
  gs = jnp.asarray([3, 0, 9])
  x, w, dy = inputs(5, 16, 8, 8, 3, jnp.float32)
  check_grads(lambda x, w: kp.gmm(x, w, gs), (x, w), order=2, modes=["rev"], atol=2e-2, rtol=2e-2)
  check_grads(lambda x, dy: kp.tgmm(x, dy, gs), (x, dy), order=1, modes=["rev"],
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


def _has_hopper():
  try:
    return jax.default_backend() == "gpu" and str(jax.devices()[0].compute_capability)[0] == "9"
  except Exception:  # noqa: BLE001 - no GPU runtime at all
    return False


GPU_CASES = [
    (1000, 256, 256, [0, 100, 0, 257, 383, 0, 200, 0]),    # 60 padded rows, empty groups
    (2048, 512, 512, [2048] + [0] * 7),
    (384, 128, 256, [1, 2, 3, 5, 8, 13, 21, 34]),          # tiny groups (decode-like)
]


@pytest.mark.gpu
@pytest.mark.skipif(not _has_hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_kernel(case):
  check_backend("gpu", case, jnp.bfloat16, seed=11 + case[0])


@pytest.mark.gpu
@pytest.mark.skipif(not _has_hopper(), reason="needs a Hopper GPU")
def test_gpu_grads_match_reference():
  m, k, n, gs = GPU_CASES[0]
  x, w, _ = inputs(12, m, k, n, len(gs), jnp.bfloat16)
  c = jax.random.normal(jax.random.key(13), (m, n), jnp.bfloat16)
  grads = {}
  for b in ("gpu", "reference"):
    loss = lambda x, w: jnp.sum(kp.gmm(x, w, jnp.asarray(gs), backend=b).astype(jnp.float32) * c)
    grads[b] = jax.jit(jax.grad(loss, (0, 1)))(x, w)
  for a, r in zip(grads["gpu"], grads["reference"]):
    assert rel_err(a, r) < 1e-2

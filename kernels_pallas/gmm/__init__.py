"""Grouped matmul over rows sorted by expert: the public ops.

gmm(x_mk, w_ekn, group_sizes_e) -> y_mn and tgmm(x_mk, dy_mn, group_sizes_e) -> dw_ekn,
both differentiable (custom_vjp: dx = gmm(dy, w^T), dw = tgmm(x, dy)), each backend's
kernels used for the backward too. gmm_swiglu(x, w_gate_up, group_sizes) -> silu(gate) * up:
the gate+up gmm with SwiGLU in the GPU kernel's epilogue. Backends: "reference" (jnp, any
platform), "gpu" (Mosaic GPU, Hopper), "tpu" (Mosaic TPU), "tpu_interpret" (the TPU kernel
interpreted, for CPU tests). "auto" picks by platform, dtype and shape and falls back to
"reference".
"""
import functools

import jax
import jax.numpy as jnp

from kernels_pallas import _dispatch
from kernels_pallas.gmm import reference

BACKENDS = ("reference", "gpu", "tpu", "tpu_interpret")


def _impl(name):
  if name == "gpu":
    from kernels_pallas.gmm import gpu
    return gpu
  if name in ("tpu", "tpu_interpret"):
    from kernels_pallas.gmm import tpu
    return tpu
  return None


def _min_rows(backend) -> int:
  """Kernels tile rows; fewer rows than one tile are zero-padded (padded rows give 0 anyway)."""
  return getattr(_impl(backend), "MIN_ROWS", 0) if backend != "reference" else 0


def _auto(m, k, n, dtype, transpose_rhs=False):
  """A kernel backend only where it tiles the forward and every backward form (fp8, a serving
  form with no backward: where the GPU kernel tiles the forward)."""
  plat = _dispatch.platform()
  name = "gpu" if plat == "gpu" and _dispatch.is_hopper() else "tpu" if plat == "tpu" else None
  if name and _is_fp8(dtype):
    ok = name == "gpu" and transpose_rhs and _impl(name).select_tiling(max(m, _min_rows(name)), k, n, dtype)
    return name if ok else "reference"
  if name and _impl(name).supports_all(max(m, _min_rows(name)), k, n, dtype)[0]:
    return name
  return "reference"


def _is_fp8(dtype) -> bool:
  return jnp.dtype(dtype).itemsize == 1 and jnp.issubdtype(dtype, jnp.floating)


def _exact_upcast(x, w):
  """fp8 operands -> bf16 (every e4m3 value is a bf16 value): the reference's dot then takes
  the same products as the kernel, on any platform."""
  if _is_fp8(x.dtype):
    return x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  return x, w


def _gmm_fwd_impl(backend, out_dtype, transpose_rhs, x, w, gs):
  if backend == "reference":
    x, w = _exact_upcast(x, w)
    return reference.gmm_reference(x, w, gs, out_dtype=out_dtype, transpose_rhs=transpose_rhs)
  return _impl(backend).gmm(x, w, gs, out_dtype=out_dtype, transpose_rhs=transpose_rhs,
                            interpret=backend == "tpu_interpret")


def _tgmm_impl(backend, out_dtype, x, dy, gs):
  if backend == "reference":
    return reference.tgmm_reference(x, dy, gs, out_dtype=out_dtype)
  return _impl(backend).tgmm(x, dy, gs, out_dtype=out_dtype,
                             interpret=backend == "tpu_interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _gmm(backend, out_dtype, transpose_rhs, x, w, gs):
  return _gmm_fwd_impl(backend, out_dtype, transpose_rhs, x, w, gs)


def _gmm_fwd(backend, out_dtype, transpose_rhs, x, w, gs):
  return _gmm(backend, out_dtype, transpose_rhs, x, w, gs), (x, w, gs)


def _gmm_bwd(backend, out_dtype, transpose_rhs, res, dy):
  x, w, gs = res
  dy = dy.astype(x.dtype)
  dx = _gmm(backend, x.dtype, not transpose_rhs, dy, w, gs)
  if transpose_rhs:   # y = x @ w^T: dw[e] = dy_e^T @ x_e
    dw = _tgmm(backend, w.dtype, dy, x, gs)
  else:
    dw = _tgmm(backend, w.dtype, x, dy, gs)
  return dx, dw, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _tgmm(backend, out_dtype, x, dy, gs):
  return _tgmm_impl(backend, out_dtype, x, dy, gs)


def _tgmm_fwd(backend, out_dtype, x, dy, gs):
  return _tgmm(backend, out_dtype, x, dy, gs), (x, dy, gs)


def _tgmm_bwd(backend, out_dtype, res, ddw):
  x, dy, gs = res
  ddw = ddw.astype(x.dtype)
  dx = _gmm(backend, x.dtype, True, dy, ddw, gs)     # dx[m] = ddw[e]^T-contracted with dy[m]
  ddy = _gmm(backend, dy.dtype, False, x, ddw, gs)   # ddy[m] = x[m] @ ddw[e]
  return dx, ddy, None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


def _check(op, x, w_or_dy, gs, w_ndim):
  if x.ndim != 2 or w_or_dy.ndim != w_ndim or gs.ndim != 1:
    raise ValueError(f"kernels_pallas.{op}: expected x [M, K], {'w [E, K, N]' if w_ndim == 3 else 'dy [M, N]'}"
                     f" and group_sizes [E]; got {x.shape}, {w_or_dy.shape}, {gs.shape}.")
  if not jnp.issubdtype(gs.dtype, jnp.integer):
    raise ValueError(f"kernels_pallas.{op}: group_sizes must be integer, got {gs.dtype}.")


def gmm(x_mk, w_ekn, group_sizes_e, *, out_dtype=None, transpose_rhs=False, backend=None):
  """y[m] = x[m] @ w[e(m)] (or w[e(m)]^T with transpose_rhs) for rows sorted by expert.

  Rows past sum(group_sizes) give 0; fp32 accumulation; out_dtype defaults to x's dtype.
  """
  x_mk, w_ekn, group_sizes_e = map(jnp.asarray, (x_mk, w_ekn, group_sizes_e))
  _check("gmm", x_mk, w_ekn, group_sizes_e, 3)
  k_w = w_ekn.shape[2] if transpose_rhs else w_ekn.shape[1]
  if x_mk.shape[1] != k_w or group_sizes_e.shape[0] != w_ekn.shape[0]:
    raise ValueError(f"kernels_pallas.gmm: x {x_mk.shape}, w {w_ekn.shape} and group_sizes "
                     f"{group_sizes_e.shape} disagree on K or E (transpose_rhs={transpose_rhs}).")
  out_dtype = jnp.dtype(out_dtype or x_mk.dtype)
  name = _dispatch.requested_backend("gmm", backend)
  if name == "auto":
    n_w = w_ekn.shape[1] if transpose_rhs else w_ekn.shape[2]
    name = _auto(x_mk.shape[0], k_w, n_w, jnp.promote_types(x_mk.dtype, w_ekn.dtype), transpose_rhs)
  _dispatch.check_known("gmm", name, BACKENDS)
  if x_mk.dtype != w_ekn.dtype:   # kernels take one operand dtype; promote like jnp.dot
    dt = jnp.promote_types(x_mk.dtype, w_ekn.dtype)
    x_mk, w_ekn = x_mk.astype(dt), w_ekn.astype(dt)
  m = x_mk.shape[0]
  rows = max(m, _min_rows(name))   # e.g. batch-1 decode: 8 rows, one 64-row tile
  x_mk = jnp.pad(x_mk, ((0, rows - m), (0, 0))) if rows > m else x_mk
  y = _gmm(name, out_dtype, bool(transpose_rhs), x_mk, w_ekn, group_sizes_e.astype(jnp.int32))
  return y[:m] if rows > m else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gmm_swiglu(backend, out_dtype, x, w, gs):
  if backend == "gpu" and _impl("gpu").swiglu_supports(x, w)[0]:
    return _impl("gpu").gmm_swiglu(x, w, gs, out_dtype=out_dtype)
  if backend == "reference":
    return reference.gmm_swiglu_reference(x, w, gs, out_dtype=out_dtype)
  # Kernels without the fused epilogue (TPU, GPU shapes it does not tile): gmm, then SwiGLU.
  return reference.swiglu_halves(gmm(x, w, gs, backend=backend)).astype(out_dtype)


def _gmm_swiglu_fwd(backend, out_dtype, x, w, gs):
  return _gmm_swiglu(backend, out_dtype, x, w, gs), (x, w, gs)


def _gmm_swiglu_bwd(backend, out_dtype, res, d_act):
  """Recomputes h = [gate | up] with gmm (the fused forward never writes it)."""
  x, w, gs = res
  h, vjp_h = jax.vjp(lambda x, w: gmm(x, w, gs, backend=backend), x, w)
  _, vjp_s = jax.vjp(reference.swiglu_halves, h)
  dh, = vjp_s(d_act.astype(jnp.float32))
  dx, dw = vjp_h(dh.astype(h.dtype))
  return dx, dw, None


_gmm_swiglu.defvjp(_gmm_swiglu_fwd, _gmm_swiglu_bwd)


def gmm_swiglu(x_mk, w_ekn, group_sizes_e, *, out_dtype=None, backend=None):
  """silu(x @ w_gate) * (x @ w_up) per group, where w's N holds [gate | up] -> [M, N / 2].

  The MoE gate+up matmul and its SwiGLU in one op. On Hopper the kernel applies SwiGLU to
  its fp32 accumulators and never writes the [M, N] gate/up product; the backward
  recomputes it with gmm. Rows past sum(group_sizes) give 0.
  """
  x_mk, w_ekn, group_sizes_e = map(jnp.asarray, (x_mk, w_ekn, group_sizes_e))
  _check("gmm_swiglu", x_mk, w_ekn, group_sizes_e, 3)
  if (x_mk.shape[1] != w_ekn.shape[1] or group_sizes_e.shape[0] != w_ekn.shape[0]
      or w_ekn.shape[2] % 2):
    raise ValueError(f"kernels_pallas.gmm_swiglu: x {x_mk.shape}, w {w_ekn.shape} and group_sizes "
                     f"{group_sizes_e.shape} disagree on K or E, or w's N is odd.")
  out_dtype = jnp.dtype(out_dtype or x_mk.dtype)
  dt = jnp.promote_types(x_mk.dtype, w_ekn.dtype)
  x_mk, w_ekn = x_mk.astype(dt), w_ekn.astype(dt)
  name = _dispatch.requested_backend("gmm", backend)
  if name == "auto":
    name = _auto(*x_mk.shape, w_ekn.shape[2], dt)
  _dispatch.check_known("gmm_swiglu", name, BACKENDS)
  return _gmm_swiglu(name, out_dtype, x_mk, w_ekn, group_sizes_e.astype(jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _gmv(backend, out_dtype, transpose_rhs, x, w, experts):
  if backend == "reference":
    x, w = _exact_upcast(x, w)
    return reference.gmv_reference(x, w, experts, out_dtype=out_dtype, transpose_rhs=transpose_rhs)
  m = x.shape[0]
  rows = max(m, _min_rows(backend))   # the kernel reads whole row tiles
  x = jnp.pad(x, ((0, rows - m), (0, 0))) if rows > m else x
  return _impl(backend).gmv(x, w, experts, out_dtype=out_dtype, transpose_rhs=transpose_rhs)[:m]


def _gmv_fwd(backend, out_dtype, transpose_rhs, x, w, experts):
  return _gmv(backend, out_dtype, transpose_rhs, x, w, experts), (x, w, experts)


def _gmv_bwd(backend, out_dtype, transpose_rhs, res, dy):
  x, w, experts = res   # a decode op: the backward is the reference's, not a kernel
  _, vjp = jax.vjp(lambda x, w: reference.gmv_reference(
      x, w, experts, out_dtype=out_dtype, transpose_rhs=transpose_rhs), x, w)
  return (*vjp(dy.astype(out_dtype)), None)


_gmv.defvjp(_gmv_fwd, _gmv_bwd)


def gmv(x_mk, w_ekn, experts_m, *, out_dtype=None, transpose_rhs=False, backend=None):
  """y[r] = x[r] @ w[experts[r]] (or its transpose) for a few rows that each name an expert.

  The decode form of gmm for one token's top-k slots: no sort, no group sizes, rows stay in
  slot order. Each row reads its expert's weights, so rows should name distinct experts (one
  token's picks do); for many rows or repeated experts, sort and use gmm.
  """
  x_mk, w_ekn, experts_m = map(jnp.asarray, (x_mk, w_ekn, experts_m))
  if x_mk.ndim != 2 or w_ekn.ndim != 3 or experts_m.shape != x_mk.shape[:1]:
    raise ValueError(f"kernels_pallas.gmv: expected x [M, K], w [E, K, N] and experts [M]; got "
                     f"{x_mk.shape}, {w_ekn.shape}, {experts_m.shape}.")
  if not jnp.issubdtype(experts_m.dtype, jnp.integer):
    raise ValueError(f"kernels_pallas.gmv: experts must be integer, got {experts_m.dtype}.")
  k_w = w_ekn.shape[2] if transpose_rhs else w_ekn.shape[1]
  n_w = w_ekn.shape[1] if transpose_rhs else w_ekn.shape[2]
  if x_mk.shape[1] != k_w:
    raise ValueError(f"kernels_pallas.gmv: x {x_mk.shape} and w {w_ekn.shape} disagree on K "
                     f"(transpose_rhs={transpose_rhs}).")
  out_dtype = jnp.dtype(out_dtype or x_mk.dtype)
  dt = jnp.promote_types(x_mk.dtype, w_ekn.dtype)
  m = x_mk.shape[0]
  name = _dispatch.requested_backend("gmm", backend)
  if name == "auto":
    name = _auto(m, k_w, n_w, dt, transpose_rhs) if m <= _min_rows("gpu") else "reference"
  _dispatch.check_known("gmv", name, BACKENDS)
  if name not in ("reference", "gpu"):
    name = "reference"   # the TPU kernel has no row-visit form yet
  x_mk, w_ekn = x_mk.astype(dt), w_ekn.astype(dt)
  return _gmv(name, out_dtype, bool(transpose_rhs), x_mk, w_ekn, experts_m.astype(jnp.int32))


def tgmm(x_mk, dy_mn, group_sizes_e, *, out_dtype=None, backend=None):
  """dw[e] = x[rows of e]^T @ dy[rows of e] -> [E, K, N] (fp32 accumulation)."""
  x_mk, dy_mn, group_sizes_e = map(jnp.asarray, (x_mk, dy_mn, group_sizes_e))
  _check("tgmm", x_mk, dy_mn, group_sizes_e, 2)
  if x_mk.shape[0] != dy_mn.shape[0]:
    raise ValueError(f"kernels_pallas.tgmm: x {x_mk.shape} and dy {dy_mn.shape} need equal rows.")
  out_dtype = jnp.dtype(out_dtype or x_mk.dtype)
  name = _dispatch.requested_backend("gmm", backend)
  if name == "auto":
    name = _auto(x_mk.shape[0], x_mk.shape[1], dy_mn.shape[1],
                 jnp.promote_types(x_mk.dtype, dy_mn.dtype))
  _dispatch.check_known("tgmm", name, BACKENDS)
  if x_mk.dtype != dy_mn.dtype:
    dt = jnp.promote_types(x_mk.dtype, dy_mn.dtype)
    x_mk, dy_mn = x_mk.astype(dt), dy_mn.astype(dt)
  return _tgmm(name, out_dtype, x_mk, dy_mn, group_sizes_e.astype(jnp.int32))


__all__ = ["gmm", "gmv", "tgmm", "BACKENDS"]

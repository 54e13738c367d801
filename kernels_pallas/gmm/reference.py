"""Pure-jnp grouped matmul: ground truth for the kernels and the fallback backend.

No densifying: a scan over row tiles (`schedule.group_start_schedule`), each tile one
[tm, K] @ [K, N] product against its group's weights, so FLOPs are
(M + G * tm) * K * N * 2 and memory is the inputs plus one output. Works under jit,
scan and grad with traced group sizes (the public op wraps it in a custom_vjp).
"""
import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.gmm.schedule import group_start_schedule


def default_tm(m):
  """Row tile: 128, or the row count rounded up to 8 when that is smaller."""
  return max(8, min(128, -(-m // 8) * 8))


def precision_for(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def gmm_reference(x_mk, w_ekn, group_sizes_e, *, out_dtype=None, transpose_rhs=False, tm=None):
  """y[m] = x[m] @ w[e(m)] for rows sorted by group; rows past sum(group_sizes) give 0.

  transpose_rhs: w is [E, N, K] and y[m] = x[m] @ w[e(m)]^T (the dx form of the backward).
  """
  x_mk, w_ekn = jnp.asarray(x_mk), jnp.asarray(w_ekn)
  out_dtype = out_dtype or x_mk.dtype
  m, _ = x_mk.shape
  num_groups = w_ekn.shape[0]
  n = w_ekn.shape[1] if transpose_rhs else w_ekn.shape[2]
  tm = tm or default_tm(m)
  sched = group_start_schedule(group_sizes_e, m, tm, zero_tail=False)
  x_pad = jnp.pad(x_mk, ((0, tm), (0, 0)))   # unaligned tiles may run past row m
  contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))
  row_t = jnp.arange(tm)

  def body(out_mn, vis):
    g, start, rows = vis
    xb_tk = jnp.where((row_t < rows)[:, None], lax.dynamic_slice_in_dim(x_pad, start, tm), 0)
    w_kn = w_ekn[jnp.minimum(g, num_groups - 1)]
    yb_tn = lax.dot_general(xb_tk, w_kn, (contract, ((), ())),
                            precision=precision_for(x_mk.dtype),
                            preferred_element_type=jnp.float32)
    ob_tn = lax.dynamic_slice_in_dim(out_mn, start, tm) + yb_tn
    return lax.dynamic_update_slice_in_dim(out_mn, ob_tn, start, 0), None

  out0 = jnp.zeros((m + tm, n), jnp.float32)
  out, _ = lax.scan(body, out0, (sched.group_v, sched.start_v, sched.rows_v))
  return out[:m].astype(out_dtype)


def swiglu_halves(h_mn):
  """[M, 2F] = [gate | up] -> silu(gate) * up, in fp32."""
  h_mn = h_mn.astype(jnp.float32)
  f = h_mn.shape[1] // 2
  return jax.nn.silu(h_mn[:, :f]) * h_mn[:, f:]


def gmm_swiglu_reference(x_mk, w_ekn, group_sizes_e, *, out_dtype=None):
  """silu(x @ w_gate) * (x @ w_up) per group, w's N = [gate | up], from fp32 products."""
  h_mn = gmm_reference(x_mk, w_ekn, group_sizes_e, out_dtype=jnp.float32)
  return swiglu_halves(h_mn).astype(out_dtype or x_mk.dtype)


def tgmm_reference(x_mk, dy_mn, group_sizes_e, *, out_dtype=None, num_groups=None, tm=None):
  """dw[e] = x[rows of e]^T @ dy[rows of e] -> [E, K, N]; empty groups give 0."""
  x_mk, dy_mn = jnp.asarray(x_mk), jnp.asarray(dy_mn)
  out_dtype = out_dtype or x_mk.dtype
  num_groups = num_groups or group_sizes_e.shape[0]
  m, k = x_mk.shape
  n = dy_mn.shape[1]
  tm = tm or default_tm(m)
  sched = group_start_schedule(group_sizes_e, m, tm, zero_tail=False)
  x_pad = jnp.pad(x_mk, ((0, tm), (0, 0)))
  dy_pad = jnp.pad(dy_mn, ((0, tm), (0, 0)))
  row_t = jnp.arange(tm)

  def body(dw_ekn, vis):
    g, start, rows = vis
    keep_t = (row_t < rows)[:, None]
    xb_tk = jnp.where(keep_t, lax.dynamic_slice_in_dim(x_pad, start, tm), 0)
    dyb_tn = jnp.where(keep_t, lax.dynamic_slice_in_dim(dy_pad, start, tm), 0)
    part_kn = lax.dot_general(xb_tk, dyb_tn, (((0,), (0,)), ((), ())),
                              precision=precision_for(x_mk.dtype),
                              preferred_element_type=jnp.float32)
    # g == num_groups is the schedule's pseudo-group (no rows): lands in the spare slot.
    return dw_ekn.at[g].add(part_kn), None

  dw0 = jnp.zeros((num_groups + 1, k, n), jnp.float32)
  dw, _ = lax.scan(body, dw0, (sched.group_v, sched.start_v, sched.rows_v))
  return dw[:num_groups].astype(out_dtype)


def gmv_reference(x_mk, w_ekn, experts_m, *, out_dtype=None, transpose_rhs=False):
  """y[r] = x[r] @ w[experts[r]] (or w[experts[r]]^T): one row at a time, no weight gather."""
  x_mk, w_ekn = jnp.asarray(x_mk), jnp.asarray(w_ekn)
  out_dtype = out_dtype or x_mk.dtype
  contract = ((0,), (1,)) if transpose_rhs else ((0,), (0,))

  def one(args):
    x_k, e = args
    return lax.dot_general(x_k, w_ekn[e], (contract, ((), ())),
                           precision=precision_for(x_mk.dtype), preferred_element_type=jnp.float32)

  return lax.map(one, (x_mk, experts_m.astype(jnp.int32))).astype(out_dtype)

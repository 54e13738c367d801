"""Pure-jnp grouped matmul: ground truth for the kernels (placeholder until the kernels land)."""
import jax
import jax.numpy as jnp


def gmm_reference(x_mk, w_ekn, group_sizes_e, *, out_dtype=None):
  """y[m] = x[m] @ w[e(m)] for rows sorted by expert; rows past sum(group_sizes) give 0."""
  out_dtype = out_dtype or x_mk.dtype
  y = jax.lax.ragged_dot(x_mk, w_ekn, group_sizes_e.astype(jnp.int32),
                         preferred_element_type=jnp.float32)
  return y.astype(out_dtype)


def tgmm_reference(x_mk, dy_mn, group_sizes_e, *, out_dtype=None):
  """dw[e] = x[rows of e]^T @ dy[rows of e] -> [E, K, N]."""
  out_dtype = out_dtype or x_mk.dtype
  num_groups = group_sizes_e.shape[0]
  ends = jnp.cumsum(group_sizes_e)
  starts = ends - group_sizes_e
  rows = jnp.arange(x_mk.shape[0])
  member_em = (rows[None] >= starts[:, None]) & (rows[None] < ends[:, None])
  del num_groups
  dw = jnp.einsum("em,mk,mn->ekn", member_em.astype(jnp.float32),
                  x_mk.astype(jnp.float32), dy_mn.astype(jnp.float32))
  return dw.astype(out_dtype)

"""Router on tensor cores: fp32-accurate logits from bf16 matmuls, then one fused XLA pass.

The unfused reference spends most of its time in the fp32 x @ w_gate (T*D*E*2 FLOPs on
the fp32 units: 34 GFLOP at T=65536, D=4096, E=64), not in reading x. Here w_gate is
split into bf16 hi + lo parts, so with bf16 x (exact in bf16) one [T, D] @ [D, 2E] bf16
matmul with fp32 accumulation gives the fp32 logits to ~2^-16 relative, at the cost of
one read of x. f32 x is split too (three products). The backward uses the same split.
The argsort is one 32-bit key sort (expert * T*k + slot: unique, so stable by
construction) and the group sizes are a one-hot reduction instead of a scatter.
"""
import jax
import jax.numpy as jnp

from kernels_pallas.router.reference import RouterSpec, Routing, route_from_logits


def split_bf16(a):
  """a (f32) -> (hi, lo) bf16 with hi + lo == a to ~2^-16 relative."""
  # hi by truncating the f32 bits, not by a round trip through bf16: XLA on GPU may drop
  # f32->bf16->f32 converts (allow_excess_precision), which made lo = 0 (seen on H100).
  a = a.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(a, jnp.uint32) & jnp.uint32(0xFFFF0000)
  hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return hi.astype(jnp.bfloat16), (a - hi).astype(jnp.bfloat16)


def _parts(a):
  return (a, None) if a.dtype == jnp.bfloat16 else split_bf16(a)


def _mm(a, b, dims):
  return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


def _split_product(a, b, dims):
  """a @ b in ~fp32 from bf16 parts: hi*hi + hi*lo + lo*hi (lo*lo is below fp32 rounding).

  The parts of b are concatenated along its free dim so a is read once, and so XLA cannot
  fold dot(a, hi) + dot(a, lo) into dot(a, hi + lo) with the sum rounded to bf16 (it does).
  """
  a_hi, a_lo = _parts(a)
  b_hi, b_lo = _parts(b)
  b_free = 1 - dims[1][0]
  n = b.shape[b_free]
  if b_lo is not None:
    both = _mm(a_hi, jnp.concatenate([b_hi, b_lo], axis=b_free), dims)
    # Without the barrier XLA sinks the slices into two dots and folds them back into
    # dot(a, hi + lo) with the sum in bf16 (seen on H100: 1.4% of top-k picks changed).
    both = jax.lax.optimization_barrier(both)
    out = both[:, :n] + both[:, n:]
  else:
    out = _mm(a_hi, b_hi, dims)
  if a_lo is not None:
    out = out + _mm(a_lo, b_hi, dims)
  return out


def _one_token_logits(x_1d, w_de):
  """x @ w for one token in fp32, as two reductions over 64-wide chunks of D.

  XLA on GPU rewrites a vector-matrix dot into multiply + reduce over the major dim of w, a
  column reduction that took 26 us a layer for [4096, 64] in the batch-1 decode step (H100);
  per-chunk partial sums then their sum take ~3 us. The barrier keeps XLA from folding the two
  reductions back into one (it does: 8 us in a microbenchmark, same as the dot).
  """
  d, e = w_de.shape
  parts = jnp.sum(x_1d.astype(jnp.float32).reshape(d // 64, 64, 1)
                  * w_de.astype(jnp.float32).reshape(d // 64, 64, e), axis=1)
  return jnp.sum(jax.lax.optimization_barrier(parts), axis=0)[None]


@jax.custom_vjp
def logits_fp32(x_td, w_de):
  if x_td.shape[0] == 1 and w_de.shape[0] % 64 == 0:   # batch-1 decode
    return _one_token_logits(x_td[0], w_de)
  return _split_product(x_td, w_de, ((1,), (0,)))


def _logits_fwd(x_td, w_de):
  return logits_fp32(x_td, w_de), (x_td, w_de)


def logits_grads(x_td, w_de, dl_te):
  """(dx, dw) of logits = x @ w, in ~fp32 from the same split (also the fused router's)."""
  dx_td = _split_product(dl_te, w_de, ((1,), (1,)))
  dw_de = _split_product(x_td, dl_te, ((0,), (0,)))
  return dx_td.astype(x_td.dtype), dw_de.astype(w_de.dtype)


def _logits_bwd(res, dl_te):
  return logits_grads(*res, dl_te)


logits_fp32.defvjp(_logits_fwd, _logits_bwd)


def route_split(x_td, w_gate_de, bias_e, spec: RouterSpec) -> Routing:
  return route_from_logits(logits_fp32(x_td, w_gate_de), bias_e, spec)

"""Attention of a few query rows per kv head over a KV cache in place: the public op.

decode_attention(q [B, kv, R, D], k_cache, v_cache [B, kv, S, D] or [L, B, kv, S, D] with a
(traced) `layer`, lengths [B]) -> o [B, kv, R, D] fp32, lse [B, kv, R] fp32. Row r of kv head h
of batch row b attends to cache rows j < lengths[b]; R holds the query heads sharing a kv head
(times the tokens of a short chunk). The lse lets the caller merge these keys with others (the
chunk's own rows) in one softmax. Backends: "reference" (jnp, any platform) and "gpu" (Mosaic
GPU, Hopper: reads only the rows below each length, straight from the stacked cache). "auto"
picks "gpu" where it applies. Forward only (serving).
"""
import jax.numpy as jnp

from kernels_pallas import _dispatch
from kernels_pallas.decode_attention import gpu
from kernels_pallas.decode_attention.reference import NEG, decode_attention_reference

BACKENDS = ("reference", "gpu")


def backend_for(q_shape, cache_shape, dtype, backend=None, cache_dtype=None) -> str:
  """The backend `decode_attention` runs for these shapes (callers that slice the cache for the
  reference, e.g. to a length bucket, skip that when the kernel reads it in place)."""
  name = _dispatch.requested_backend("decode_attention", backend)
  if name == "auto":
    ok = _dispatch.is_hopper() and not gpu.why_not(q_shape, cache_shape, dtype,
                                                   cache_dtype=cache_dtype)
    name = "gpu" if ok else "reference"
  _dispatch.check_known("decode_attention", name, BACKENDS)
  return name


def decode_attention(q_bkrd, k_cache, v_cache, lengths_b, layer=None, *, backend=None):
  q_bkrd = jnp.asarray(q_bkrd)
  stacked = layer is not None
  if k_cache.ndim != 4 + stacked or v_cache.shape != k_cache.shape:
    raise ValueError(f"kernels_pallas.decode_attention: caches must be [{'L, ' * stacked}B, kv, S, D] "
                     f"and alike, got {k_cache.shape} and {v_cache.shape} (pass layer= for a "
                     "stacked cache).")
  b, kv, _, d = q_bkrd.shape
  if v_cache.dtype != k_cache.dtype:
    raise ValueError(f"kernels_pallas.decode_attention: K and V caches differ in dtype "
                     f"({k_cache.dtype}, {v_cache.dtype}); store them alike.")
  if k_cache.shape[stacked:stacked + 2] != (b, kv) or k_cache.shape[-1] != d:
    raise ValueError(f"kernels_pallas.decode_attention: q {q_bkrd.shape} does not match the cache "
                     f"{k_cache.shape} in batch, kv heads or head_dim.")
  name = backend_for(q_bkrd.shape, k_cache.shape, q_bkrd.dtype, backend, k_cache.dtype)
  if name == "gpu":
    why = gpu.why_not(q_bkrd.shape, k_cache.shape, q_bkrd.dtype, cache_dtype=k_cache.dtype)
    if why:
      raise ValueError(f"kernels_pallas.decode_attention backend='gpu': {why}; use backend='reference'.")
    return gpu.decode_attention(q_bkrd, k_cache, v_cache, lengths_b, layer)
  return decode_attention_reference(q_bkrd, k_cache, v_cache, lengths_b, layer)


__all__ = ["decode_attention", "backend_for", "BACKENDS", "NEG"]

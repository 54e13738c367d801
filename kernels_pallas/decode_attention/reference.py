"""Attention of a few query rows over a KV cache up to each batch row's length: jnp reference.

Semantics shared by every backend: query rows r of kv head h of batch row b see cache rows
j < lengths[b] of that head; scores in fp32 scaled by D^-0.5; the probabilities are rounded to
the cache dtype before P.V (fp32 accumulation). Returns o [B, kv, R, D] fp32 (normalised) and
lse [B, kv, R] fp32 (natural log); a row with length 0 gets o = 0 and lse = NEG, so a caller
merging it with other keys gives it weight 0.
"""
import jax
import jax.numpy as jnp

NEG = -1e30  # finite: masked scores never make inf - inf


def layer_cache(cache, layer):
  """[L, B, kv, S, D] at `layer` (traced is fine), or the cache itself when layer is None."""
  return cache if layer is None else jax.lax.dynamic_index_in_dim(cache, layer, 0, keepdims=False)


def decode_attention_reference(q_bkrd, k_cache, v_cache, lengths_b, layer=None):
  k, v = layer_cache(k_cache, layer), layer_cache(v_cache, layer)
  d = q_bkrd.shape[-1]
  s = jnp.einsum("bkrd,bksd->bkrs", q_bkrd, k.astype(q_bkrd.dtype),
                 preferred_element_type=jnp.float32) * (d ** -0.5)
  valid_bs = jnp.arange(k.shape[2])[None] < lengths_b[:, None]
  s = jnp.where(valid_bs[:, None, None], s, NEG)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("bkrs,bksd->bkrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  has = (lengths_b > 0)[:, None, None]
  o = jnp.where(has[..., None], o / l[..., None], 0.0)
  lse = jnp.where(has, m[..., 0] + jnp.log(l), NEG)
  return o, lse

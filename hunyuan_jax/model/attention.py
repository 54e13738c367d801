"""GQA attention with QK-norm (order per family), RoPE, cross-layer K/V sharing and a KV cache.

K/V flow (HUNYUAN_SPEC.md 2.4, 2.6):
  a "self" layer projects K/V; a "shared" (CLA) layer reuses the previous self layer's K/V and
  applies its own key norm. The KV cache of a CLA model therefore keeps post-RoPE, pre-norm keys
  (one entry per layer pair) and every layer norms them on read; a model without CLA keeps the
  final keys so that decode reads the cache once.

Cache layout per cached layer: k, v [B, n_kv, S_max, D] (heads before length, so the score and
P.V matmuls read it without a transpose). The cache is read-only inside the layer stack: a layer
attends to the cached rows before its chunk plus the chunk's own new K/V, and returns the new rows;
`write_kv_rows` stores them after the stack in one scatter (in place when the cache is donated), so
the layer scan never copies the cache. A query at absolute position p sees cached rows
j < (first position of its chunk) of its own batch row plus the chunk's rows at positions <= p, so
slots of a continuous batch never see another slot's or a stale entry.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from hunyuan_jax.config import ModelConfig
from hunyuan_jax.model.layers import apply_rope, compute_dtype, einsum_f32, param, rms_norm

NEG_INF = -1e30  # finite, so fully masked rows (padding) give a uniform softmax, not NaN


class KV(NamedTuple):
  k_bsnd: jax.Array
  v_bsnd: jax.Array


def _store_prenorm_keys(cfg: ModelConfig) -> bool:
  return cfg.cla_share_factor > 1 and cfg.qk_norm == "after_rope"


def write_kv_rows(cache: KV, rows: KV, positions_bt: jax.Array, batch_index_b=None) -> KV:
  """Stores new rows [R, B, T, n_kv, D] into a stacked cache [R, B', n_kv, S, D] at their positions.

  `batch_index_b` maps row b of `rows` to a cache row (default: the same row); positions past
  S_max are dropped, which is how callers mask padding and inactive slots.
  """
  b = positions_bt.shape[0]
  b_idx = (jnp.arange(b) if batch_index_b is None else batch_index_b)[:, None]

  def put(buf, new):  # buf[:, b, :, pos] indexes as [B, T, R, n_kv, D]
    return buf.at[:, b_idx, :, positions_bt].set(jnp.moveaxis(new, 0, 2).astype(buf.dtype), mode="drop")

  return KV(put(cache.k_bsnd, rows.k_bsnd), put(cache.v_bsnd, rows.v_bsnd))


def attention_mask(q_pos_bt, k_pos_bs, q_seg_bt=None, k_seg_bs=None) -> jax.Array:
  """Causal (by absolute position) and same-segment mask -> bool [B, T, S]."""
  mask = k_pos_bs[:, None, :] <= q_pos_bt[:, :, None]
  if q_seg_bt is not None:
    mask &= q_seg_bt[:, :, None] == k_seg_bs[:, None, :]
  return mask


def dot_attention(q_btnd, k_bsnd, v_bsnd, mask_bts, dtype, cached: Optional[KV] = None,
                  cached_mask_bts=None) -> jax.Array:
  """Reference attention: fp32 scores and softmax, probabilities cast back before P.V.

  `cached` (k, v [B, n_kv, S, D]) adds read-only cache rows beside the chunk's own K/V; one softmax
  spans both.
  """
  b, t, n, d = q_btnd.shape
  kv = k_bsnd.shape[2]
  q = q_btnd.reshape(b, t, kv, n // kv, d)  # query head h uses kv head h // G
  s = einsum_f32("btkgd,bskd->bkgts", q, k_bsnd.astype(q.dtype))
  s = jnp.where(mask_bts[:, None, None], s * (d ** -0.5), NEG_INF)
  if cached is not None:
    s_old = einsum_f32("btkgd,bksd->bkgts", q, cached.k_bsnd.astype(q.dtype))
    s_old = jnp.where(cached_mask_bts[:, None, None], s_old * (d ** -0.5), NEG_INF)
    s = jnp.concatenate([s_old, s], axis=-1)
  p = jax.nn.softmax(s, axis=-1).astype(dtype)
  if cached is not None:
    s_max = cached.k_bsnd.shape[2]
    o = (jnp.einsum("bkgts,bksd->btkgd", p[..., :s_max], cached.v_bsnd.astype(dtype)) +
         jnp.einsum("bkgts,bskd->btkgd", p[..., s_max:], v_bsnd.astype(dtype)))
  else:
    o = jnp.einsum("bkgts,bskd->btkgd", p, v_bsnd.astype(dtype))
  return o.reshape(b, t, n, d)


def flash_attention(q_btnd, k_bsnd, v_bsnd, dtype) -> jax.Array:
  """cuDNN fused causal attention (GPU, no cache, no packing)."""
  return jax.nn.dot_product_attention(q_btnd.astype(dtype), k_bsnd.astype(dtype),
                                      v_bsnd.astype(dtype), is_causal=True,
                                      implementation="cudnn")


class Attention(nn.Module):
  cfg: ModelConfig
  kv_source: str  # "self" or "shared"

  @nn.compact
  def __call__(self, x_btd, cos_sin, positions_bt, segment_ids_bt=None,
               shared_kv: Optional[KV] = None, cache: Optional[KV] = None):
    """Returns (out_btd, this chunk's K/V rows for the cache and the next CLA layer)."""
    cfg, dt = self.cfg, compute_dtype(self.cfg)
    pdt = jnp.dtype(cfg.param_dtype)
    n, kvh, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    wq = param(self, "q", (h, n, d), ("embed", "heads", "head_dim"), pdt, fan_in=h)
    wo = param(self, "o", (n, d, h), ("heads", "head_dim", "embed"), pdt, fan_in=n * d)
    q_norm = k_norm = None
    if cfg.qk_norm != "none":
      ones = nn.initializers.ones
      q_norm = param(self, "q_norm", (d,), ("head_dim",), pdt, init=ones)
      k_norm = param(self, "k_norm", (d,), ("head_dim",), pdt, init=ones)
    cos, sin = cos_sin
    x = x_btd.astype(dt)
    q = jnp.einsum("btd,dnh->btnh", x, wq.astype(dt))
    if cfg.qk_norm == "before_rope":
      q = rms_norm(q, q_norm, cfg.rms_norm_eps)
    q = apply_rope(q, cos, sin)
    if cfg.qk_norm == "after_rope":
      q = rms_norm(q, q_norm, cfg.rms_norm_eps)

    if self.kv_source == "self":
      wk = param(self, "k", (h, kvh, d), ("embed", "kv_heads", "head_dim"), pdt, fan_in=h)
      wv = param(self, "v", (h, kvh, d), ("embed", "kv_heads", "head_dim"), pdt, fan_in=h)
      k = jnp.einsum("btd,dnh->btnh", x, wk.astype(dt))
      v = jnp.einsum("btd,dnh->btnh", x, wv.astype(dt))
      if cfg.qk_norm == "before_rope":
        k = rms_norm(k, k_norm, cfg.rms_norm_eps)
      k = apply_rope(k, cos, sin)
      if cfg.qk_norm == "after_rope" and not _store_prenorm_keys(cfg):
        k = rms_norm(k, k_norm, cfg.rms_norm_eps)
      rows = KV(k, v)
    else:  # CLA: reuse the K/V rows of the self layer before it
      if shared_kv is None:
        raise ValueError("a cross-layer-attention layer needs the K/V of the layer before it")
      rows = shared_kv

    keys, values = rows
    if _store_prenorm_keys(cfg):  # each layer of a CLA pair applies its own key norm on read
      keys = rms_norm(keys.astype(dt), k_norm, cfg.rms_norm_eps)
      if cache is not None:
        cache = KV(rms_norm(cache.k_bsnd.astype(dt), k_norm, cfg.rms_norm_eps), cache.v_bsnd)

    if cache is None and cfg.attention_impl == "cudnn" and segment_ids_bt is None:
      o = flash_attention(q, keys, values, dt)
    else:
      mask = attention_mask(positions_bt, positions_bt, segment_ids_bt, segment_ids_bt)
      cached_mask = None
      if cache is not None:  # cached rows strictly before this chunk's first position
        s_max = cache.k_bsnd.shape[2]
        start_b1 = jnp.min(positions_bt, axis=1, keepdims=True)
        cached_mask = jnp.broadcast_to((jnp.arange(s_max)[None] < start_b1)[:, None, :],
                                       (positions_bt.shape[0], positions_bt.shape[1], s_max))
      o = dot_attention(q, keys, values, mask, dt, cache, cached_mask)
    out = jnp.einsum("btnh,nhd->btd", o.astype(dt), wo.astype(dt))
    return out, rows

"""GQA attention with QK-norm (order per family), RoPE, cross-layer K/V sharing and a KV cache.

K/V flow (HUNYUAN_SPEC.md 2.4, 2.6):
  a "self" layer projects K/V; a "shared" (CLA) layer reuses the previous self layer's K/V and
  applies its own key norm. The KV cache of a CLA model therefore keeps post-RoPE, pre-norm keys
  (one entry per layer pair) and every layer norms them on read; a model without CLA keeps the
  final keys so that decode reads the cache once.

Cache layout: k, v [layers, B, n_kv, S_max, D] (heads before length, so the score and P.V
matmuls read it without a transpose). Every layer gets the whole stacked cache and its layer index:
the cache is read-only inside the layer stack, and `kernels_pallas.decode_attention` reads the
layer's rows in place (on Hopper only those below each row's length: no slice, no copy, one
program for every length). A layer attends to the cached rows before its chunk plus the chunk's
own new K/V (two parts merged by their log-sum-exp: one softmax), and returns the new rows;
`write_kv_rows` stores them after the stack in one scatter (in place when the cache is donated).
A query at absolute position p sees cached rows j < (first position of its chunk) of its own batch
row plus the chunk's rows at positions <= p, so slots of a continuous batch never see another
slot's or a stale entry; a chunk at a position past the cache (an idle slot) reads no rows.

Serving layout: `fuse_qkv` joins a layer's q, k, v kernels into one `qkv` (one GEMM a layer, in
blocks per tensor shard); the layer uses it whenever its params hold it.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

import kernels_pallas as kp
from hunyuan_jax.config import ModelConfig
from hunyuan_jax.model import moe_parallel
from hunyuan_jax.model.layers import apply_rope, compute_dtype, einsum_f32, param, project, rms_norm
from hunyuan_jax.sharding import logical_to_mesh_spec

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


def qkv_shards(cfg: ModelConfig, mesh=None) -> int:
  """Tensor shards of the heads (1 without a mesh); 0 when q and K/V heads shard differently,
  which leaves q, k, v apart (a fused kernel's per-shard blocks would not line up)."""
  if mesh is None:
    return 1

  def count(axis, size):
    entry = logical_to_mesh_spec(jax.sharding.PartitionSpec(axis), (size,), mesh)[0]
    axes = entry if isinstance(entry, tuple) else (entry,) if entry else ()
    return math.prod(mesh.shape[a] for a in axes)

  s = count("heads", cfg.num_heads)
  return s if s == count("kv_heads", cfg.num_kv_heads) else 0


def fuse_qkv(params, shards: int = 1):
  """Serving layout: each attention layer that owns K/V gets one `qkv` kernel [..., H, S, G, D]
  for its q, k, v ([..., H, n, D] and [..., H, kv, D]; S = `shards` (see qkv_shards),
  G = (n + 2 kv) / S): block s holds shard s's q heads, then its k and v heads, so one GEMM
  (one weight read, one cuBLAS ramp) serves all three and the block axis shards over `tensor`
  like the heads. Returns a new tree; the input is not changed."""
  s = shards

  def fuse(q, k, v):
    lead = q.shape[:-2]
    blocks = [w.reshape(lead + (s, w.shape[-2] // s, w.shape[-1])) for w in (q, k, v)]
    return jnp.concatenate(blocks, axis=-2)

  def walk(tree):
    if not isinstance(tree, dict):
      return tree
    out = {key: walk(sub) for key, sub in tree.items()}
    if {"q", "k", "v"} <= out.keys() and not isinstance(out["q"], dict):
      q, k, v = out.pop("q"), out.pop("k"), out.pop("v")
      out["qkv"] = jax.jit(fuse, out_shardings=_blocks_like_heads(q))(q, k, v)
    return out

  return walk(params)


def _blocks_like_heads(q):
  """q's sharding [..., H, n, D] carried over to [..., H, S, G, D] (S sharded as n was)."""
  sharding = getattr(q, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  spec = list(sharding.spec) + [None] * (q.ndim - len(sharding.spec))
  spec = spec[:-1]            # [..., H, n] -> [..., H, S]; G and D are whole
  while spec and spec[-1] is None:   # the short form, as jit returns it (no new sharding)
    spec.pop()
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def split_qkv(y_btsgd, num_heads: int, num_kv_heads: int):
  """The `qkv` projection [B, T, S, G, D] -> q [B, T, n, D], k, v [B, T, kv, D]."""
  b, t, s, _, d = y_btsgd.shape
  nq, nk = num_heads // s, num_kv_heads // s
  part = lambda lo, size: y_btsgd[:, :, :, lo:lo + size].reshape(b, t, s * size, d)
  return part(0, nq), part(nq, nk), part(nq + nk, nk)


def _layer(stacked, layer):
  return jax.lax.dynamic_index_in_dim(stacked, layer, 0, keepdims=False)


def attention_mask(q_pos_bt, k_pos_bs, q_seg_bt=None, k_seg_bs=None) -> jax.Array:
  """Causal (by absolute position) and same-segment mask -> bool [B, T, S]."""
  mask = k_pos_bs[:, None, :] <= q_pos_bt[:, :, None]
  if q_seg_bt is not None:
    mask &= q_seg_bt[:, :, None] == k_seg_bs[:, None, :]
  return mask


def dot_attention(q_btnd, k_bsnd, v_bsnd, mask_bts, dtype) -> jax.Array:
  """Reference attention: fp32 scores and softmax, probabilities cast back before P.V."""
  b, t, n, d = q_btnd.shape
  kv = k_bsnd.shape[2]
  q = q_btnd.reshape(b, t, kv, n // kv, d)  # query head h uses kv head h // G
  s = einsum_f32("btkgd,bskd->bkgts", q, k_bsnd.astype(q.dtype))
  s = jnp.where(mask_bts[:, None, None], s * (d ** -0.5), NEG_INF)
  p = jax.nn.softmax(s, axis=-1).astype(dtype)
  o = jnp.einsum("bkgts,bskd->btkgd", p, v_bsnd.astype(dtype))
  return o.reshape(b, t, n, d)


def cached_attention(q_btnd, k_btkd, v_btkd, mask_btt, cache: KV, layer, lengths_b, dtype) -> jax.Array:
  """Attention over `lengths_b` cached rows of `layer` plus the chunk's own rows, one softmax.

  The cache part (`kernels_pallas.decode_attention`) returns its normalised output and
  log-sum-exp; the chunk part is computed here and the two merge in fp32.
  """
  b, t, n, d = q_btnd.shape
  kv = k_btkd.shape[2]
  g = n // kv
  q5 = q_btnd.reshape(b, t, kv, g, d)
  q_bkrd = jnp.moveaxis(q5, 1, 2).reshape(b, kv, t * g, d)   # rows (token, head) share a kv head
  o_c, lse_c = _decode_attention(q_bkrd, cache.k_bsnd, cache.v_bsnd, lengths_b, layer)
  o_c = jnp.moveaxis(o_c.reshape(b, kv, t, g, d), 2, 1)      # [b, t, kv, g, d]
  lse_c = jnp.moveaxis(lse_c.reshape(b, kv, t, g), 2, 1)

  s = einsum_f32("btkgd,bskd->btkgs", q5, k_btkd.astype(q5.dtype)) * (d ** -0.5)
  s = jnp.where(mask_btt[:, :, None, None], s, NEG_INF)
  m_n = jnp.max(s, axis=-1)
  p = jnp.exp(s - m_n[..., None])
  o_n = jnp.einsum("btkgs,bskd->btkgd", p.astype(dtype), v_btkd.astype(dtype),
                   preferred_element_type=jnp.float32)
  m = jnp.maximum(m_n, lse_c)
  w_c, w_n = jnp.exp(lse_c - m), jnp.exp(m_n - m)
  o = (w_c[..., None] * o_c + w_n[..., None] * o_n) / (w_c + w_n * jnp.sum(p, axis=-1))[..., None]
  return o.astype(dtype).reshape(b, t, n, d)


def cache_read_in_place(cfg: ModelConfig, batch: int, max_len: int, cache_dtype=None) -> bool:
  """Whether a decode step's cache attention runs the kernel that reads the whole cache in place
  up to each row's length (callers then pass the whole cache: no length bucket to slice)."""
  if _store_prenorm_keys(cfg):   # CLA keys are normed on read: the layer's keys are materialised
    return False
  q = (batch, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
  c = (1, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  cache_dt = jnp.dtype(cache_dtype or cfg.dtype)
  return kp.decode_attention_backend(q, c, compute_dtype(cfg), cache_dtype=cache_dt) != "reference"


def _decode_attention(q_bkrd, k_cache, v_cache, lengths_b, layer):
  """`kp.decode_attention`, per shard under an active mesh (the kernel is a custom call with no
  sharding rule; the reference runs per shard too, so CPU tests cover the same specs)."""
  mesh = moe_parallel.active_mesh()
  op = kp.decode_attention
  if mesh is None:
    return op(q_bkrd, k_cache, v_cache, lengths_b, layer)
  spec = lambda names, x: logical_to_mesh_spec(jax.sharding.PartitionSpec(*names), x.shape, mesh)
  q_spec = spec(("batch", "kv_heads", None, None), q_bkrd)
  c_spec = spec(("layers", "batch", "kv_heads", "cache_length", "head_dim"), k_cache)
  lse_spec = jax.sharding.PartitionSpec(*q_spec[:3])
  fn = jax.shard_map(op, mesh=mesh,
                     in_specs=(q_spec, c_spec, c_spec, jax.sharding.PartitionSpec(q_spec[0]),
                               jax.sharding.PartitionSpec()),
                     out_specs=(q_spec, lse_spec), check_vma=False)
  return fn(q_bkrd, k_cache, v_cache, lengths_b, jnp.asarray(layer, jnp.int32))


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
               shared_kv: Optional[KV] = None, cache: Optional[KV] = None, layer=None):
    """Returns (out_btd, this chunk's K/V rows for the cache and the next CLA layer).

    `cache` is the stacked cache [layers, B, n_kv, S, D]; `layer` (traced) picks this layer's.
    """
    cfg, dt = self.cfg, compute_dtype(self.cfg)
    pdt = jnp.dtype(cfg.param_dtype)
    n, kvh, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    own_kv = self.kv_source == "self"
    fused = own_kv and self.has_variable("params", "qkv")   # the serving layout (fuse_qkv)
    if not fused:
      wq = param(self, "q", (h, n, d), ("embed", "heads", "head_dim"), pdt, fan_in=h)
    wo = param(self, "o", (n, d, h), ("heads", "head_dim", "embed"), pdt, fan_in=n * d)
    q_norm = k_norm = None
    if cfg.qk_norm != "none":
      ones = nn.initializers.ones
      q_norm = param(self, "q_norm", (d,), ("head_dim",), pdt, init=ones)
      k_norm = param(self, "k_norm", (d,), ("head_dim",), pdt, init=ones)
    cos, sin = cos_sin
    x = x_btd.astype(dt)
    if fused:
      q, k, v = split_qkv(project(x, self.get_variable("params", "qkv").astype(dt)), n, kvh)
    elif own_kv:
      wk = param(self, "k", (h, kvh, d), ("embed", "kv_heads", "head_dim"), pdt, fan_in=h)
      wv = param(self, "v", (h, kvh, d), ("embed", "kv_heads", "head_dim"), pdt, fan_in=h)
      q, k, v = (project(x, w.astype(dt)) for w in (wq, wk, wv))
    else:
      q = project(x, wq.astype(dt))
    if cfg.qk_norm == "before_rope":
      q = rms_norm(q, q_norm, cfg.rms_norm_eps)
    q = apply_rope(q, cos, sin)
    if cfg.qk_norm == "after_rope":
      q = rms_norm(q, q_norm, cfg.rms_norm_eps)

    if own_kv:
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
      if cache is not None:   # this layer's normed keys, as a one-layer stack
        normed = rms_norm(_layer(cache.k_bsnd, layer).astype(dt), k_norm, cfg.rms_norm_eps)
        cache, layer = KV(normed.astype(cache.v_bsnd.dtype)[None], _layer(cache.v_bsnd, layer)[None]), 0

    mask = attention_mask(positions_bt, positions_bt, segment_ids_bt, segment_ids_bt)
    if cache is not None:   # cached rows strictly before this chunk's first position
      s_max = cache.k_bsnd.shape[3]
      start_b = jnp.min(positions_bt, axis=1)
      lengths_b = jnp.where(start_b < s_max, start_b, 0)
      o = cached_attention(q, keys, values, mask, cache, layer, lengths_b, dt)
    elif cfg.attention_impl == "cudnn" and segment_ids_bt is None:
      o = flash_attention(q, keys, values, dt)
    else:
      o = dot_attention(q, keys, values, mask, dt)
    out = project(o.astype(dt), wo.astype(dt), 2)
    return out, rows

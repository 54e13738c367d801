"""The decoder stack and the one pure `forward` that training and serving both call.

Layers are grouped into runs of a repeated pattern (`ModelConfig.layer_groups`): A13B is one
run of 32 MoE layers, Large one run of 32 (self, shared-KV) pairs, Hy3 a dense layer then 79
MoE layers. Each run is an `nn.scan`, so compile time does not grow with depth. Parameters
then live at params["groups_<i>"]["unit"]["layer_<j>"][...] with a leading "layers" axis.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from hunyuan_jax.config import REMAT_POLICIES, LayerSpec, ModelConfig
from hunyuan_jax.model.attention import KV, Attention, write_kv_rows
from hunyuan_jax.model.layers import RMSNorm, SwiGLU, compute_dtype, param, rope_cos_sin
from hunyuan_jax.model.moe import EXPERT_GATE_UP, MoE, MoEStats

Cache = dict  # {"groups_<i>": KV [repeats, B, n_kv, S, D]} for groups that own K/V


class ForwardOut(NamedTuple):
  logits: jax.Array                  # [B, T, V] float32
  cache: Optional[Cache]              # the input cache with this chunk's rows written
  kv_rows: Optional[dict]            # {"groups_<i>": KV [repeats, B, T, n_kv, D]}: just the new rows
  moe_stats: dict                    # {"groups_<i>": MoEStats with leading [repeats, ...]} for MoE layers
  hidden: jax.Array                  # [B, T, H] final-normed hidden states (MTP and heads use them)


class DecoderLayer(nn.Module):
  cfg: ModelConfig
  spec: LayerSpec

  @nn.compact
  def __call__(self, h_btd, cos_sin, positions_bt, segment_ids_bt, shared_kv, cache, layer=None):
    cfg = self.cfg
    a, kv = Attention(cfg, self.spec.kv_source, name="attn")(
        RMSNorm(cfg, name="input_norm")(h_btd), cos_sin, positions_bt, segment_ids_bt,
        shared_kv, cache, layer)
    h_btd = h_btd + a
    x = RMSNorm(cfg, name="post_attn_norm")(h_btd)
    if self.spec.ffn == "moe":
      m, stats = MoE(cfg, self.spec, name="moe")(x)
    else:
      m, stats = SwiGLU(cfg, self.spec.ffn_size, name="mlp")(x), None
    return h_btd + m, kv, stats


class MTPLayer(nn.Module):
  """u = W_eh [enorm(emb_{t+1}); hnorm(h_t)] -> one MoE decoder layer -> final_layernorm."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, emb_btd, h_btd, cos_sin, positions_bt, segment_ids_bt):
    cfg, dt = self.cfg, compute_dtype(self.cfg)
    d = cfg.hidden_size
    w_eh = param(self, "eh_proj", (2 * d, d), (None, "embed"), jnp.dtype(cfg.param_dtype), fan_in=2 * d)
    u = jnp.concatenate([RMSNorm(cfg, name="enorm")(emb_btd), RMSNorm(cfg, name="hnorm")(h_btd)], -1)
    u = jnp.einsum("btk,kd->btd", u.astype(dt), w_eh.astype(dt))
    spec = cfg.layer_spec(cfg.num_layers - 1)._replace(kv_source="self")
    u, _, stats = DecoderLayer(cfg, spec, name="layer")(u, cos_sin, positions_bt, segment_ids_bt,
                                                        None, None)
    return RMSNorm(cfg, name="final_norm")(u), stats


class Unit(nn.Module):
  """One repetition of a layer pattern (at most one layer owns K/V); the scan body.

  Every unit gets the whole stacked cache (read-only, broadcast) and its own index into it; the
  new K/V rows are a scan output, so the scan never copies the cache (see attention.py).
  """
  cfg: ModelConfig
  pattern: tuple

  @nn.compact
  def __call__(self, h_btd, cache, index, cos_sin, positions_bt, segment_ids_bt):
    shared_kv, rows, stats = None, None, []
    for j, spec in enumerate(self.pattern):
      # A CLA "shared" layer reads the K/V rows (and cache) of the self layer before it.
      h_btd, shared_kv, s = DecoderLayer(self.cfg, spec, name=f"layer_{j}")(
          h_btd, cos_sin, positions_bt, segment_ids_bt, shared_kv, cache, index)
      if spec.kv_source == "self":
        rows = shared_kv
      if s is not None:
        stats.append(s)
    # One stats entry per unit: CLA pairs hold two MoE layers, stacked on a new axis.
    unit_stats = jax.tree.map(lambda *xs: jnp.stack(xs), *stats) if stats else None
    return h_btd, (rows if cache is not None else None, unit_stats)


def _and_expert_matmuls(policy):
  """The policy, plus the routed experts' gate+up output (a Pallas call, which jax's dot
  policies do not see; the down projection's output is never needed, see moe.down_combine)."""
  cp = jax.checkpoint_policies
  return cp.save_from_both_policies(policy, cp.save_only_these_names(EXPERT_GATE_UP))


_REMAT_POLICIES = {   # keys: config.REMAT_POLICIES
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep every matmul output, recompute the elementwise ops: no matmul FLOPs recomputed.
    "dots": _and_expert_matmuls(jax.checkpoint_policies.checkpoint_dots),
    "dots_no_batch": _and_expert_matmuls(jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims),
    # Less memory: the experts' gate+up gmm runs again in the backward.
    "dots_except_experts": jax.checkpoint_policies.checkpoint_dots,
}
assert tuple(_REMAT_POLICIES) == REMAT_POLICIES


def _scanned_unit(cfg: ModelConfig, repeats: int):
  unit_cls = Unit
  if cfg.remat_policy != "none":
    unit_cls = nn.remat(Unit, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
  return nn.scan(
      unit_cls, variable_axes={"params": 0}, split_rngs={"params": True},
      in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast, nn.broadcast), length=repeats,
      metadata_params={nn.PARTITION_NAME: "layers"})


class Transformer(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    pdt = jnp.dtype(cfg.param_dtype)
    self.embed = param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt,
                       init=nn.initializers.normal(0.02))
    if not cfg.tie_word_embeddings:
      self.lm_head = param(self, "lm_head", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                           pdt, fan_in=cfg.hidden_size)   # vocabulary-major, as HF stores it
    self.groups = [
        _scanned_unit(cfg, repeats)(cfg, pattern, name=f"groups_{i}")
        for i, (pattern, repeats) in enumerate(cfg.layer_groups())
    ]
    self.final_norm = RMSNorm(cfg)
    self.mtp = [MTPLayer(cfg, name=f"mtp_{i}") for i in range(cfg.num_mtp_layers)]

  def embed_tokens(self, tokens_bt):
    return jnp.take(self.embed, tokens_bt, axis=0).astype(compute_dtype(self.cfg))

  def head_weight(self):
    """The output projection, vocabulary-major [V, H] (the embedding itself when tied)."""
    return self.embed if self.cfg.tie_word_embeddings else self.lm_head

  def logits(self, h_btd):
    """fp32 logits rounded to the compute dtype first, as the reference does (`logits.float()`
    on the bf16 lm_head output, HUNYUAN_SPEC 2.8). It also keeps the decode head a bf16 GEMV:
    an fp32-output dot with cuBLAS at batch 1 upcast the 1 GB embedding every step (H100 run 5).
    Training's loss applies the head itself, in fp32 (train/cross_entropy.py)."""
    dt = compute_dtype(self.cfg)
    w = self.head_weight().astype(dt)
    h = h_btd.astype(dt)
    v = w.shape[0]
    a = v - v % 128
    if v % 8 and a and h.shape[0] * h.shape[1] > 1:
      # cuBLAS's bf16 GEMMs want dims that are multiples of 8, and XLA pads the whole [V, H]
      # weight for them: a 1 GB copy each decode step at A13B's V = 128167 (0.71 of 1.11 ms at
      # batch 32 on the H100). The aligned rows are read in place, the rest is a small GEMM;
      # each logit is the same dot either way. (One row runs a GEMV, which pads nothing.)
      parts = [jnp.einsum("btd,vd->btv", h, w[:a]), jnp.einsum("btd,vd->btv", h, w[a:])]
      return jnp.concatenate(parts, axis=-1).astype(jnp.float32)
    return jnp.einsum("btd,vd->btv", h, w).astype(jnp.float32)

  def __call__(self, tokens_bt, positions_bt, cache: Optional[Cache] = None,
               segment_ids_bt=None, return_hidden_only: bool = False) -> ForwardOut:
    cfg = self.cfg
    h = self.embed_tokens(tokens_bt)
    cos_sin = rope_cos_sin(cfg, positions_bt, compute_dtype(cfg))
    new_cache, rows, stats = {}, {}, {}
    for i, (group, (_, repeats)) in enumerate(zip(self.groups, cfg.layer_groups())):
      key = f"groups_{i}"
      group_cache = None if cache is None else cache.get(key)
      h, (group_rows, gs) = group(h, group_cache, jnp.arange(repeats), cos_sin, positions_bt,
                                  segment_ids_bt)
      if group_rows is not None:
        rows[key] = group_rows
        new_cache[key] = write_kv_rows(group_cache, group_rows, positions_bt)
      if gs is not None:
        stats[key] = gs
    h = self.final_norm(h)
    logits = None if return_hidden_only else self.logits(h)
    if cache is None:
      return ForwardOut(logits, None, None, stats, h)
    return ForwardOut(logits, new_cache, rows, stats, h)

  def mtp_forward(self, hidden_btd, next_tokens_bt, positions_bt, segment_ids_bt=None):
    """Hy3 multi-token prediction (spec 2.9): logits for token t+2 from h_t and token t+1."""
    cos_sin = rope_cos_sin(self.cfg, positions_bt, compute_dtype(self.cfg))
    logits, stats = [], []
    h = hidden_btd
    for layer in self.mtp:
      h, s = layer(self.embed_tokens(next_tokens_bt), h, cos_sin, positions_bt, segment_ids_bt)
      logits.append(self.logits(h))
      stats.append(s)
    return logits, stats


# ---------------------------------------------------------------------------------------
# Pure functions over a params pytree
# ---------------------------------------------------------------------------------------
def forward(params, tokens_bt, positions_bt, cache: Optional[Cache] = None, *, cfg: ModelConfig,
            segment_ids_bt=None, return_hidden_only: bool = False) -> ForwardOut:
  """The functional core: logits (and the updated cache when one is given).

  `return_hidden_only` skips the head (logits None): the trainer's fused loss applies it.
  """
  return Transformer(cfg).apply({"params": params}, tokens_bt, positions_bt, cache, segment_ids_bt,
                                return_hidden_only)


def head_weight(params, *, cfg: ModelConfig) -> jax.Array:
  """The output projection [V, H] in the compute dtype."""
  w = Transformer(cfg).apply({"params": params}, method=Transformer.head_weight)
  return w.astype(compute_dtype(cfg))


def forward_mtp(params, hidden_btd, next_tokens_bt, positions_bt, *, cfg: ModelConfig,
                segment_ids_bt=None):
  """MTP logits (one entry per MTP layer) from `ForwardOut.hidden` and the next tokens."""
  return Transformer(cfg).apply({"params": params}, hidden_btd, next_tokens_bt, positions_bt,
                                segment_ids_bt, method=Transformer.mtp_forward)


def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
  """Random parameters as a plain pytree (logical axes stripped; see `param_logical_axes`)."""
  return nn.unbox(_init_boxed(cfg, rng))


def _init_boxed(cfg: ModelConfig, rng):
  tokens = jnp.zeros((1, 1), jnp.int32)

  def init_all(model, tokens):
    out = model(tokens, tokens)
    if cfg.num_mtp_layers:  # touch the MTP layers so that init creates them
      model.mtp_forward(out.hidden, tokens, tokens)
    return out

  return nn.init(init_all, Transformer(cfg))(rng, tokens)["params"]


def abstract_params(cfg: ModelConfig):
  """ShapeDtypeStructs of the params without allocating them."""
  return nn.unbox(jax.eval_shape(functools.partial(_init_boxed, cfg), jax.random.key(0)))


def param_logical_axes(cfg: ModelConfig):
  """Pytree of logical-axis PartitionSpecs matching `init_params(cfg)`."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, cfg), jax.random.key(0))
  return nn.get_partition_spec(boxed)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> Cache:
  """Zeroed KV cache: one K/V per cached layer (CLA pairs share one)."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  cache = {}
  for i, (pattern, repeats) in enumerate(cfg.layer_groups()):
    if any(s.kv_source == "self" for s in pattern):
      shape = (repeats, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
      cache[f"groups_{i}"] = KV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
  return cache


def cache_logical_axes(cfg: ModelConfig) -> Cache:
  """Logical axes of `init_cache`'s arrays (same tree)."""
  spec = jax.sharding.PartitionSpec("layers", "batch", "kv_heads", "cache_length", "head_dim")
  return {key: KV(spec, spec) for key in jax.eval_shape(lambda: init_cache(cfg, 1, 1))}

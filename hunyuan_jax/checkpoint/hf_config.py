"""ModelConfig -> HF config.json for export (the inverse of config.parse_hf_config).

A13B exports as transformers' `hunyuan_v1_moe`, Hy3 as `hy_v3`, dense as `hunyuan_v1_dense`, and
Large as the `hunyuan` remote-code config (transformers has no CLA). Extra remote-code keys
(`moe_intermediate_size`, `num_shared_expert`, ...) are written too: transformers ignores them and
our parser reads them, so `from_hf_config(to_hf_config(cfg))` gives back the checkpoint fields.
A config that a format cannot express raises an error naming the field.
"""
from __future__ import annotations

from typing import Any

from hunyuan_jax.config import ModelConfig


def _bad(field: str, why: str):
  raise ValueError(f"cannot export ModelConfig.{field} to HF config.json: {why}")


def _rope_parameters(cfg: ModelConfig) -> dict:
  if cfg.rope_alpha:
    return {"rope_type": "dynamic", "alpha": float(cfg.rope_alpha), "factor": 1.0,
            "rope_theta": float(cfg.rope_theta)}
  return {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}


def _uniform(cfg: ModelConfig, field: str, layers: list[int]):
  values = {getattr(cfg, field)[i] for i in layers}
  if len(values) > 1:
    _bad(field, f"{cfg.family} configs hold one value for all MoE layers, got {sorted(values)}")
  return values.pop() if values else getattr(cfg, field)[0]


def _common(cfg: ModelConfig) -> dict[str, Any]:
  eos = list(cfg.eos_token_ids)
  return {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size, "rms_norm_eps": cfg.rms_norm_eps,
      "max_position_embeddings": cfg.max_position_embeddings,
      "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu", "attention_bias": False,
      "pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id,
      "eos_token_id": eos[0] if len(eos) == 1 else eos,
  }


def _hy3(cfg: ModelConfig) -> dict[str, Any]:
  moe = [i for i, t in enumerate(cfg.mlp_layer_types) if t == "moe"]
  size = _uniform(cfg, "moe_intermediate_size", moe)
  shared = _uniform(cfg, "shared_expert_size", moe)
  if shared % size:
    _bad("shared_expert_size", f"{shared} is not a multiple of moe_intermediate_size {size}")
  if cfg.qk_norm == "after_rope":
    _bad("qk_norm", "hy_v3 applies the QK norm before RoPE")
  out = _common(cfg)
  out.update(
      architectures=["HYV3ForCausalLM"], model_type="hy_v3",
      mlp_layer_types=["sparse" if t == "moe" else "dense" for t in cfg.mlp_layer_types],
      num_experts=cfg.num_experts, num_experts_per_tok=_uniform(cfg, "moe_top_k", moe),
      moe_intermediate_size=size, num_shared_experts=shared // size,
      router_scaling_factor=cfg.router_scale, route_norm=cfg.router_renormalize,
      enable_moe_fp32_combine=cfg.moe_fp32_combine, qk_norm=cfg.qk_norm != "none",
      num_nextn_predict_layers=cfg.num_mtp_layers, rope_parameters=_rope_parameters(cfg))
  return out


def _hunyuan(cfg: ModelConfig) -> dict[str, Any]:
  if cfg.qk_norm == "before_rope":
    _bad("qk_norm", "Hunyuan v1 (A13B/Large) applies the QK norm after RoPE")
  types = cfg.mlp_layer_types
  skipped = types.index("moe") if "moe" in types else len(types)
  if any(t != "moe" for t in types[skipped:]):
    _bad("mlp_layer_types", "Hunyuan v1 configs only allow dense layers first (moe_layer_num_skipped)")
  num_shared = []
  for s in cfg.shared_expert_size:
    if s % cfg.intermediate_size:
      _bad("shared_expert_size", f"{s} is not a multiple of intermediate_size {cfg.intermediate_size}")
    num_shared.append(s // cfg.intermediate_size)
  out = _common(cfg)
  out.update(
      num_experts=cfg.num_experts, moe_topk=list(cfg.moe_top_k),
      moe_intermediate_size=list(cfg.moe_intermediate_size), num_shared_expert=num_shared,
      use_mixed_mlp_moe=any(num_shared), moe_layer_num_skipped=skipped,
      norm_topk_prob=cfg.router_renormalize, use_qk_norm=cfg.qk_norm != "none",
      use_cla=cfg.cla_share_factor > 1, cla_share_factor=max(cfg.cla_share_factor, 2))
  if cfg.family == "large":  # remote-code format: head_dim = hidden / heads
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
      _bad("head_dim", "the `hunyuan` remote-code format derives head_dim = hidden_size / num_heads")
    out.update(architectures=["HunYuanForCausalLM"], model_type="hunyuan", rope_theta=cfg.rope_theta,
               attention_head_dim=cfg.head_dim)
    if cfg.rope_alpha:
      out["rope_scaling"] = {"type": "dynamic", "alpha": float(cfg.rope_alpha), "factor": 1.0}
    return out
  out.update(architectures=["HunYuanMoEV1ForCausalLM"], model_type="hunyuan_v1_moe",
             rope_parameters=_rope_parameters(cfg))
  return out


def _dense(cfg: ModelConfig) -> dict[str, Any]:
  out = _common(cfg)
  out.update(architectures=["HunYuanDenseV1ForCausalLM"], model_type="hunyuan_v1_dense",
             use_qk_norm=cfg.qk_norm != "none", rope_parameters=_rope_parameters(cfg))
  return out


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
  if cfg.router_scoring != ("sigmoid" if cfg.family == "hy3" else "softmax"):
    _bad("router_scoring", f"{cfg.router_scoring!r} is not what the {cfg.family} format implies")
  if cfg.family == "hy3":
    return _hy3(cfg)
  if cfg.family == "dense":
    return _dense(cfg)
  return _hunyuan(cfg)


def generation_config(cfg: ModelConfig) -> dict[str, Any]:
  eos = list(cfg.eos_token_ids)
  return {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
          "eos_token_id": eos[0] if len(eos) == 1 else eos}

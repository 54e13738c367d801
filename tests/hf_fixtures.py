"""Tiny random-weight transformers models (the PyTorch reference), saved as HF checkpoints.

Weights are re-drawn with a larger scale than transformers' init (std 0.02 would make every
logit ~0 and every router decision a near tie), so that parity tests are sensitive: routers
have clear top-k margins, QK norms and RMSNorm weights are not all ones, and the Hy3 expert
bias is large enough to change which experts are selected.
"""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file

A13B_KW = dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
               moe_topk=[2, 3, 2], max_position_embeddings=256, tie_word_embeddings=True,
               rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0},
               pad_token_id=0, bos_token_id=1, eos_token_id=2)

# head_dim * heads (96) != hidden (64) like the real Hy3; 2 shared experts; dense first layer.
HY3_KW = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=8,
              num_experts_per_tok=3, moe_intermediate_size=16, num_shared_experts=2,
              max_position_embeddings=256, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _redraw(model: torch.nn.Module, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or "layernorm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif "gate.wg" in name or name.endswith("mlp.gate.weight"):
        p.copy_(torch.randn(p.shape, generator=gen) * (3.0 / math.sqrt(p.shape[-1])))
      elif "embed_tokens" in name or "lm_head" in name:
        p.copy_(torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        # Sigmoid scores live in (0, 1): +-0.3 moves many top-3 choices.
        b.copy_(0.3 * torch.randn(b.shape, generator=gen))


def build_a13b(seed: int = 0):
  from transformers.models.hunyuan_v1_moe import HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM
  torch.manual_seed(seed)
  model = HunYuanMoEV1ForCausalLM(HunYuanMoEV1Config(**A13B_KW)).float().eval()
  _redraw(model, seed)
  return model


def build_hy3(seed: int = 0):
  from transformers.models.hy_v3 import HYV3Config, HYV3ForCausalLM
  torch.manual_seed(seed)
  model = HYV3ForCausalLM(HYV3Config(**HY3_KW)).float().eval()
  _redraw(model, seed)
  return model


def save_hf(model, out_dir: str, **kw) -> str:
  """`save_pretrained` (transformers 5.23 writes the Hub per-expert layout, see WORKSPACE_NOTES)."""
  model.save_pretrained(out_dir, safe_serialization=True, **kw)
  return out_dir


def save_fused_v5(model, out_dir: str) -> str:
  """The transformers v5 in-memory layout (`state_dict()`: fused experts, Hy3 TF names) as safetensors."""
  os.makedirs(out_dir, exist_ok=True)
  model.config.save_pretrained(out_dir)
  sd = {k: v.contiguous() for k, v in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    sd.pop("lm_head.weight", None)
  save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  return out_dir


def write_remote_code_config(hub_dir: str, out_dir: str) -> str:
  """An A13B `hunyuan` remote-code config.json (rope_scaling + per-layer lists) beside the same weights."""
  os.makedirs(out_dir, exist_ok=True)
  kw = A13B_KW
  n = kw["num_hidden_layers"]
  cfg = {
      "architectures": ["HunYuanMoEV1ForCausalLM"], "model_type": "hunyuan",
      "auto_map": {"AutoModelForCausalLM": "hunyuan.HunYuanMoEV1ForCausalLM"},
      "vocab_size": kw["vocab_size"], "hidden_size": kw["hidden_size"], "num_hidden_layers": n,
      "num_attention_heads": kw["num_attention_heads"], "num_key_value_heads": kw["num_key_value_heads"],
      "attention_head_dim": kw["head_dim"], "intermediate_size": kw["intermediate_size"],
      "moe_intermediate_size": [kw["intermediate_size"]] * n, "num_experts": kw["num_experts"],
      "moe_topk": kw["moe_topk"], "num_shared_expert": [1] * n, "use_mixed_mlp_moe": True,
      "use_qk_norm": True, "use_cla": False, "cla_share_factor": 2, "moe_layer_num_skipped": 0,
      "rope_theta": 10000.0, "rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0,
                                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                              "mscale_all_dim": 1.0},
      "max_position_embeddings": kw["max_position_embeddings"], "rms_norm_eps": 1e-5,
      "tie_word_embeddings": True, "hidden_act": "silu", "attention_dropout": 0.1,
      "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
  }
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  for name in os.listdir(hub_dir):
    if name.endswith(".safetensors") or name.endswith(".index.json"):
      os.symlink(os.path.join(hub_dir, name), os.path.join(out_dir, name))
  return out_dir


def build_dense(seed: int = 0):
  """HunYuan v1 dense: A13B attention (QK-norm after RoPE, alpha RoPE) with SwiGLU everywhere."""
  from transformers.models.hunyuan_v1_dense import HunYuanDenseV1Config, HunYuanDenseV1ForCausalLM
  torch.manual_seed(seed)
  kw = {k: v for k, v in A13B_KW.items() if k not in ("num_experts", "moe_topk")}
  model = HunYuanDenseV1ForCausalLM(HunYuanDenseV1Config(**kw)).float().eval()
  _redraw(model, seed)
  return model

"""Tiny ModelConfigs of each family for fast CPU tests (random weights)."""
from hunyuan_jax.config import ModelConfig


def tiny(family: str, num_layers: int = 4, **overrides) -> ModelConfig:
  n = num_layers
  base = dict(family=family, vocab_size=97, hidden_size=32, num_layers=n, num_heads=4, num_kv_heads=2,
              head_dim=8, intermediate_size=48, rope_alpha=1000.0, mlp_layer_types=("moe",) * n,
              num_experts=4, moe_top_k=(2,) * n, moe_intermediate_size=(16,) * n,
              shared_expert_size=(16,) * n, dtype="float32", param_dtype="float32")
  if family == "large":
    base.update(cla_share_factor=2, moe_top_k=(1,) * n, router_renormalize=False)
  elif family == "hy3":
    base.update(qk_norm="before_rope", rope_alpha=0.0, rope_theta=11158840.0,
                mlp_layer_types=("dense",) + ("moe",) * (n - 1), router_scoring="sigmoid",
                router_bias=True, router_scale=2.826, router_eps=1e-20, moe_fp32_combine=True,
                tie_word_embeddings=False, num_mtp_layers=1)
  elif family == "dense":
    base.update(mlp_layer_types=("dense",) * n, shared_expert_size=(0,) * n)
  base.update(overrides)
  return ModelConfig(**base)

"""Compile time vs depth: scanned layer groups make an 80-layer model compile like a few layers.

    python experiments/compile_time.py

Prints lower+compile seconds of a jitted forward+backward for Hy3-shaped tiny models (dense layer 0,
then MoE layers) of increasing depth. Without scanning, compile time grows ~linearly with depth.
"""
import json
import sys
import time

import jax
import jax.numpy as jnp

from hunyuan_jax.config import ModelConfig
from hunyuan_jax.model import abstract_params, forward


def hy3_like(num_layers: int) -> ModelConfig:
  n = num_layers
  return ModelConfig(family="hy3", vocab_size=256, hidden_size=64, num_layers=n, num_heads=4, num_kv_heads=2,
                     head_dim=16, intermediate_size=96, qk_norm="before_rope", rope_theta=11158840.0,
                     mlp_layer_types=("dense",) + ("moe",) * (n - 1), num_experts=8, moe_top_k=(2,) * n,
                     moe_intermediate_size=(32,) * n, shared_expert_size=(32,) * n, router_scoring="sigmoid",
                     router_bias=True, router_scale=2.826, router_eps=1e-20, moe_fp32_combine=True,
                     tie_word_embeddings=False, dtype="float32", param_dtype="float32")


def compile_seconds(cfg: ModelConfig) -> float:
  def loss(params, tokens):
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return jnp.mean(forward(params, tokens, pos, cfg=cfg).logits ** 2)

  tokens = jax.ShapeDtypeStruct((2, 32), jnp.int32)
  start = time.perf_counter()
  jax.jit(jax.value_and_grad(loss)).lower(abstract_params(cfg), tokens).compile()
  return time.perf_counter() - start


if __name__ == "__main__":
  depths = [int(d) for d in sys.argv[1:]] or [2, 4, 20, 80]
  results = {d: compile_seconds(hy3_like(d)) for d in depths}
  print(json.dumps({"jax": jax.__version__, "backend": jax.default_backend(), "compile_s": results}))
  for d, s in results.items():
    print(f"layers {d:3d}: compile {s:6.2f} s")

"""Serving-time weight formats. fp8: the routed experts in e4m3 (see fp8.py)."""
from hunyuan_jax.quant.fp8 import (QUANTIZATIONS, Fp8Weight, expert_gmm, expert_gmv, is_quantized, quantize_experts,
                                   quantize_layer_experts, quantize_rows, quantize_weight)

__all__ = ["QUANTIZATIONS", "Fp8Weight", "expert_gmm", "expert_gmv", "is_quantized", "quantize_experts",
           "quantize_layer_experts", "quantize_rows", "quantize_weight"]

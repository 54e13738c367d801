"""Pallas kernels for Mixture-of-Experts layers (fused top-k router, grouped matmul) and for
their decode (attention over a KV cache in place).

Standalone: imports nothing from hunyuan_jax. Each public op picks a backend from the
platform and falls back to its pure-jnp reference where no kernel applies.
"""
from kernels_pallas.decode_attention import backend_for as decode_attention_backend
from kernels_pallas.decode_attention import decode_attention
from kernels_pallas.gmm import gmm, gmm_swiglu, gmv, tgmm
from kernels_pallas.router import RouterSpec, Routing, expert_order, inverse_permutation, route

__all__ = ["decode_attention", "decode_attention_backend", "gmm", "gmm_swiglu", "gmv", "tgmm", "route", "RouterSpec", "Routing", "expert_order", "inverse_permutation"]

"""Pallas kernels for Mixture-of-Experts layers: fused top-k router and grouped matmul.

Standalone: imports nothing from hunyuan_jax. Each public op picks a backend from the
platform and falls back to its pure-jnp reference where no kernel applies.
"""
from kernels_pallas.gmm import gmm, gmv, tgmm
from kernels_pallas.router import RouterSpec, Routing, expert_order, inverse_permutation, route

__all__ = ["gmm", "gmv", "tgmm", "route", "RouterSpec", "Routing", "expert_order", "inverse_permutation"]

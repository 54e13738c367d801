"""Top-k MoE router: the public op.

Backends: "reference" (fp32 logits with HIGHEST precision: exact, slow on GPU), "split"
(fp32-accurate logits from bf16 tensor-core matmuls, see split.py) and "gpu" (the fused
Mosaic GPU kernel: logits, top-k, the expert order's block prefixes and the statistics in one
read of x, see gpu.py). "auto" picks "gpu" on
Hopper where its tiling applies, else "split" on GPU and TPU, and "reference" on CPU.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from kernels_pallas import _dispatch
from kernels_pallas.router.reference import (RouterSpec, Routing, expert_order, inverse_permutation,
                                             route_reference)
from kernels_pallas.router import gpu
from kernels_pallas.router.split import route_split

BACKENDS = ("reference", "split", "gpu")


def _fused_applies(x_td, w_gate_de, bias_e, spec: RouterSpec) -> str:
  """Why the fused kernel cannot run these inputs ('' when it can)."""
  if spec.scoring == "softmax" and bias_e is not None:
    return "a selection bias on a softmax router"
  t, d = x_td.shape
  args = (t, d, w_gate_de.shape[1], spec.top_k, x_td.dtype)
  if gpu.select_tiling(*args) is None:
    return gpu.why_not(*args)
  return ""


def route(x_td, w_gate_de, bias_e: Optional[jax.Array], spec: RouterSpec, *,
          backend=None) -> Routing:
  """fp32 logits -> scores -> top-k (selection may add bias_e) -> weights, sort, stats."""
  x_td, w_gate_de = jnp.asarray(x_td), jnp.asarray(w_gate_de)
  if x_td.ndim != 2 or w_gate_de.ndim != 2 or x_td.shape[1] != w_gate_de.shape[0]:
    raise ValueError(f"kernels_pallas.route: expected x [T, D] and w_gate [D, E], got "
                     f"{x_td.shape} and {w_gate_de.shape}.")
  if not 1 <= spec.top_k <= w_gate_de.shape[1]:
    raise ValueError(f"kernels_pallas.route: top_k={spec.top_k} must be in [1, E={w_gate_de.shape[1]}].")
  name = _dispatch.requested_backend("route", backend)
  if name == "auto":
    if _dispatch.platform() == "cpu":
      name = "reference"
    else:
      fused = _dispatch.is_hopper() and not _fused_applies(x_td, w_gate_de, bias_e, spec)
      name = "gpu" if fused else "split"
  _dispatch.check_known("route", name, BACKENDS)
  if name == "gpu":
    why = _fused_applies(x_td, w_gate_de, bias_e, spec)
    if why:
      raise ValueError(f"kernels_pallas.route backend='gpu': {why}; use backend='split'.")
    return gpu.route_gpu(x_td, w_gate_de, bias_e, spec)
  impl = route_split if name == "split" else route_reference
  return impl(x_td, w_gate_de, bias_e, spec)


__all__ = ["route", "RouterSpec", "Routing", "BACKENDS", "expert_order", "inverse_permutation"]

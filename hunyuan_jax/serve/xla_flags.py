"""XLA flags for GPU decoding, set before the backend starts (XLA reads XLA_FLAGS once).

Measured on the H100 (WORKSPACE_NOTES.md, Inference): the decode step slices each layer's K/V
out of the stacked cache inside the layer scan, and XLA copied every slice (a MemcpyD2D of the
whole cache per step: 8.5 ms of a 31 ms batch-32 step at 16K context) because the attention dots
were Triton fusions, which cannot read a dynamic slice in place. With cuBLAS dots and
dynamic-slice fusion the dots read the slice where it lies: 67% -> 90% of the HBM roofline.
"""
from __future__ import annotations

import os

DECODE_GPU_FLAGS = ("--xla_gpu_enable_dynamic_slice_fusion=true",
                    "--xla_gpu_enable_triton_gemm=false")


def use_decode_xla_flags() -> None:
  """Adds DECODE_GPU_FLAGS to XLA_FLAGS, keeping any value the user set for the same flag.

  Call before the first JAX computation; on CPU the flags are accepted and do nothing.
  """
  current = os.environ.get("XLA_FLAGS", "").split()
  names = {f.split("=")[0] for f in current}
  os.environ["XLA_FLAGS"] = " ".join(current + [f for f in DECODE_GPU_FLAGS
                                                if f.split("=")[0] not in names])

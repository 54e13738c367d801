"""XLA flags for the GPU train and decode programs, set before the backend starts (XLA reads
XLA_FLAGS once). Each was measured on the H100 (WORKSPACE_NOTES.md); on CPU they do nothing.
XLA aborts on a flag it does not know: jaxlib 0.10.2 and 0.11.2 know these (setup.cfg asks for
jax >= 0.10.2).

Decode: the step slices each layer's K/V out of the stacked cache inside the layer scan, and XLA
copied every slice (a MemcpyD2D of the whole cache per step: 8.5 ms of a 31 ms batch-32 step at
16K context) because the attention dots were Triton fusions, which cannot read a dynamic slice in
place. With cuBLAS dots and dynamic-slice fusion the dots read the slice where it lies: 67% -> 90%
of the HBM roofline. The dot merger joined the K and V projections of one token into one dot
and concatenated their weights for it, a 16 MB copy per layer and step (10 us of a 0.37 ms
batch-1 layer on the H100); the threshold 0 turns it off.

Train: the backward of the layer scan writes each layer's weight gradient into a stacked buffer
that XLA zero-filled first (6.4 GB per microbatch at A13B width: 9.5 ms of a 110 ms step).
Zero-init elimination skips the fill when the scan writes every slot: 110 -> 101 ms (1
microbatch), 794 -> 695 ms (8).
"""
from __future__ import annotations

import os

DECODE_GPU_FLAGS = ("--xla_gpu_enable_dynamic_slice_fusion=true",
                    "--xla_gpu_enable_triton_gemm=false",
                    "--xla_gpu_dot_merger_threshold_mb=0")
TRAIN_GPU_FLAGS = ("--xla_gpu_enable_dus_accumulator_zero_init_elimination=true",)


def use_xla_flags(wanted) -> None:
  """Adds `wanted` to XLA_FLAGS, keeping any value the user set for the same flag.

  Call before the first JAX computation.
  """
  current = os.environ.get("XLA_FLAGS", "").split()
  names = {f.split("=")[0] for f in current}
  os.environ["XLA_FLAGS"] = " ".join(current + [f for f in wanted if f.split("=")[0] not in names])


def use_decode_xla_flags() -> None:
  use_xla_flags(DECODE_GPU_FLAGS)


def use_train_xla_flags() -> None:
  use_xla_flags(TRAIN_GPU_FLAGS)

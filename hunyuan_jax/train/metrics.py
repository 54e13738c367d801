"""Model FLOPs and MFU (as defined in shared/BENCHMARKS.md), progress lines, scalar logging.

MFU = model FLOPs / (step time x peak). Model FLOPs per token = 6 x active matmul parameters
(the k routed experts and the shared expert, never all experts; the tied embedding counts once,
as the lm_head matmul) + causal attention 12 x layers x seq x heads x head_dim / 2.
Scalars go to TensorBoard (tensorboardX) when it is installed and always to metrics.jsonl.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import jax
import numpy as np

from hunyuan_jax.config import ModelConfig

# Dense bf16 matmul peak per chip, datasheet (no sparsity), TFLOP/s.
DATASHEET_TFLOPS = {"H100": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0,
                    "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v4": 275.0, "TPU v6": 918.0}


def datasheet_tflops(device=None) -> float:
  kind = (device or jax.devices()[0]).device_kind
  for name, tflops in DATASHEET_TFLOPS.items():
    if name.lower() in kind.lower():
      return tflops
  return 0.0


def active_matmul_params(cfg: ModelConfig) -> float:
  """Parameters one token multiplies by: routed experts scaled by top_k / num_experts."""
  from hunyuan_jax.model import abstract_params
  groups = cfg.layer_groups()
  total = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]:
    names = [getattr(k, "key", str(k)) for k in path]
    size = math.prod(leaf.shape)
    if leaf.ndim <= 1 or names[-1] in ("scale", "q_norm", "k_norm", "expert_bias"):
      continue
    if names[0] == "embed" and not cfg.tie_word_embeddings:
      continue  # a lookup; the separate lm_head is the matmul
    if names[0].startswith("mtp_"):
      continue  # MTP is an extra objective, not the model
    if "moe" in names and names[names.index("moe") + 1] in ("wi", "wo"):
      pattern = groups[int(names[0].split("_")[1])][0]
      spec = pattern[int(names[1].split("_")[1])]
      size *= spec.top_k / cfg.num_experts
    total += size
  return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  attention = 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim / 2
  return 6 * active_matmul_params(cfg) + attention


class Logger:
  """Progress lines on stdout; scalars to TensorBoard (if available) and metrics.jsonl."""

  def __init__(self, run_dir: str, enabled: bool = True):
    self.enabled = enabled
    self.tb = None
    self.jsonl = None
    if not enabled:
      return
    os.makedirs(run_dir, exist_ok=True)
    self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
    except ImportError:
      pass

  def scalars(self, step: int, values: dict, load_le: Optional[np.ndarray] = None):
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    if load_le is not None and load_le.size:
      mean_e = load_le.mean(axis=0)
      values["moe/load_max_over_mean"] = float(load_le.max(axis=1).mean() * load_le.shape[1])
      if len(mean_e) <= 64:
        values.update({f"moe/load/expert_{e}": float(x) for e, x in enumerate(mean_e)})
    self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in values.items():
        self.tb.add_scalar(k, v, step)

  def close(self):
    if self.jsonl:
      self.jsonl.close()
    if self.tb is not None:
      self.tb.close()


def progress_line(step: int, total: int, m: dict, tokens_per_s: float, mfu: Optional[float],
                  step_s: float) -> str:
  mfu_s = f"{100 * mfu:5.1f}%" if mfu is not None else "  n/a"
  return (f"step {step:>6d}/{total} | loss {m['loss']:.4f} (mean {m['loss_window_mean']:.4f}) | aux {m['aux_loss']:.3f} | "
          f"z {m['z_loss']:.2f} | gnorm {m['grad_norm']:.3f} | lr {m['lr']:.2e} | "
          f"{tokens_per_s:,.0f} tok/s | MFU {mfu_s} | " +
          (f"{step_s:.3f} s/step" if step_s == step_s else "compiling"))

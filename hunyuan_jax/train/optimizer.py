"""AdamW with warmup + decay, global-norm clipping and per-group learning-rate scales.

Expert-specific learning rates (Hunyuan-Large report, 2.3): a routed expert sees only about
top_k / num_experts of the tokens, so its gradient is noisier and its effective batch smaller;
the report scales its learning rate down (by the square root of the batch ratio for Adam).
Here the scales multiply Adam's final update per parameter group, which for Adam is exactly a
per-group learning rate (the decoupled weight decay scales with it). Hy3's `expert_bias` gets
scale 0: it is updated outside the optimizer (step.py, aux-loss-free balancing).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from hunyuan_jax.config import ModelConfig
from hunyuan_jax.train.run_config import OptimConfig


def schedule(opt: OptimConfig, total_steps: int) -> optax.Schedule:
  warmup = max(0, min(opt.warmup_steps, total_steps))
  decay_steps = max(1, total_steps - warmup)
  end = opt.lr * opt.min_lr_ratio
  if opt.decay == "cosine":
    after = optax.cosine_decay_schedule(opt.lr, decay_steps, alpha=opt.min_lr_ratio)
  elif opt.decay == "linear":
    after = optax.linear_schedule(opt.lr, end, decay_steps)
  else:
    after = optax.constant_schedule(opt.lr)
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(opt.lr / warmup, opt.lr, warmup - 1), after],
                              [warmup])


def param_group(path: tuple) -> str:
  """"routed_expert", "shared_expert", "expert_bias", "no_decay" (norms, 1-D) or "default"."""
  names = [getattr(k, "key", str(k)) for k in path]
  if "moe" in names:
    i = names.index("moe")
    if names[i + 1] in ("wi", "wo"):
      return "routed_expert"
    if names[i + 1] == "shared":
      return "shared_expert"
    if names[i + 1] == "expert_bias":
      return "expert_bias"
  if names[-1] in ("scale", "q_norm", "k_norm"):
    return "no_decay"
  return "default"


def expert_lr_scale(opt: OptimConfig, cfg: ModelConfig) -> float:
  if opt.expert_lr_scale == "auto":
    moe_k = [k for k, t in zip(cfg.moe_top_k, cfg.mlp_layer_types) if t == "moe"] or [1]
    return math.sqrt(max(moe_k) / cfg.num_experts)
  return float(opt.expert_lr_scale)


def lr_scales(params: Any, opt: OptimConfig, cfg: ModelConfig) -> Any:
  by_group = {"routed_expert": expert_lr_scale(opt, cfg), "shared_expert": opt.shared_expert_lr_scale,
              "expert_bias": 0.0, "no_decay": 1.0, "default": 1.0}
  return jax.tree_util.tree_map_with_path(lambda p, _: by_group[param_group(p)], params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
  """Multiplies each update leaf by a constant from a tree of Python floats (stateless)."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u if s == 1.0 else (u * s).astype(u.dtype), updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(opt: OptimConfig, cfg: ModelConfig, params: Any, total_steps: int):
  """(optax transform, lr schedule) for params shaped like `params` (arrays or ShapeDtypeStructs)."""
  lr = schedule(opt, total_steps)
  decay_mask = jax.tree_util.tree_map_with_path(
      lambda p, x: len(x.shape) > 1 and param_group(p) not in ("no_decay", "expert_bias"), params)
  mu_dtype = jnp.dtype(opt.mu_dtype) if opt.mu_dtype else None
  parts = []
  if opt.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.clip_norm))
  parts.append(optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                           mask=decay_mask, mu_dtype=mu_dtype))
  parts.append(scale_by_tree(lr_scales(params, opt, cfg)))
  return optax.chain(*parts), lr

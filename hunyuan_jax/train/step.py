"""The train step: loss (cross-entropy + MoE aux losses), grads, optax update, under one jit.

State is a plain dict {"step", "params", "opt_state"}: params are the fp32 master weights, the
forward casts them to `cfg.dtype` (bf16) at use. The step is
`jax.jit(in_shardings=(state, batch), out_shardings=(state, replicated), donate_argnums=0)`;
parameter and optimizer shardings come from the logical-axis rules (hunyuan_jax/sharding.py).

A step whose loss or gradient norm is not finite leaves the state unchanged (so the host can
checkpoint the last good state and stop) and reports `finite = False`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hunyuan_jax.config import ModelConfig
from hunyuan_jax.model import forward, forward_mtp, head_weight, init_params
from hunyuan_jax.model import moe_parallel
from hunyuan_jax.sharding import batch_sharding, param_shardings
from hunyuan_jax.train.cross_entropy import linear_cross_entropy
from hunyuan_jax.train.run_config import MoETrainConfig

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


# ---------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------
def moe_losses(moe_stats: dict) -> dict[str, jax.Array]:
  """Layer-averaged aux losses and per-layer load [L_moe, E] from ForwardOut.moe_stats."""
  if not moe_stats:
    zero = jnp.zeros((), jnp.float32)
    return {"aux_loss": zero, "z_loss": zero, "dropped_frac": zero, "load": jnp.zeros((0, 1))}
  frac = jnp.concatenate([s.expert_frac_e.reshape(-1, s.expert_frac_e.shape[-1])
                          for s in moe_stats.values()])
  prob = jnp.concatenate([s.mean_prob_e.reshape(frac.shape[0], -1) for s in moe_stats.values()])
  z = jnp.concatenate([s.z_loss.reshape(-1) for s in moe_stats.values()])
  dropped = jnp.concatenate([s.dropped_frac.reshape(-1) for s in moe_stats.values()])
  num_experts = frac.shape[-1]
  # Switch balance loss: E * sum_e frac_e * prob_e; 1 when balanced. frac has no gradient.
  aux = num_experts * jnp.sum(jax.lax.stop_gradient(frac) * prob, axis=-1)
  return {"aux_loss": jnp.mean(aux), "z_loss": jnp.mean(z), "dropped_frac": jnp.mean(dropped),
          "load": frac}


def loss_fn(params, batch: dict, num_tokens: jax.Array, *, cfg: ModelConfig, moe: MoETrainConfig,
            num_micro: int):
  """Token-summed cross-entropy / num_tokens (of the whole step) + aux losses / num_micro."""
  out = forward(params, batch["inputs"], batch["positions"], cfg=cfg,
                segment_ids_bt=batch.get("segment_ids"), return_hidden_only=True)
  w_vd = head_weight(params, cfg=cfg)
  ce_sum = linear_cross_entropy(out.hidden.reshape(-1, w_vd.shape[1]).astype(w_vd.dtype), w_vd,
                                batch["targets"].reshape(-1), batch["loss_mask"].reshape(-1))
  m = moe_losses(out.moe_stats)
  aux = moe.aux_loss_weight * m["aux_loss"] + moe.z_loss_weight * m["z_loss"]
  if cfg.num_mtp_layers and moe.mtp_loss_weight > 0:
    m["mtp_loss"] = mtp_loss(params, out.hidden, batch, cfg)
    aux = aux + moe.mtp_loss_weight * m["mtp_loss"]
  return ce_sum / num_tokens + aux / num_micro, {"ce_sum": ce_sum, **m}


def mtp_loss(params, hidden_btd, batch: dict, cfg: ModelConfig) -> jax.Array:
  """Mean cross-entropy of the MTP layers: from h_t and token t+1, predict token t+2 (same document)."""
  seg = batch.get("segment_ids")
  mask = batch["loss_mask"][:, :-1] * batch["loss_mask"][:, 1:]
  if seg is not None:
    mask = mask * (seg[:, :-1] == seg[:, 1:])
  logits_per_layer, _ = forward_mtp(params, hidden_btd[:, :-1], batch["targets"][:, :-1],
                                    batch["positions"][:, :-1], cfg=cfg,
                                    segment_ids_bt=None if seg is None else seg[:, :-1])
  target = batch["targets"][:, 1:]
  losses = []
  for logits in logits_per_layer:  # layer i would predict t+2+i; Hy3 ships one layer
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, target[..., None], -1)[..., 0]
    losses.append(jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0))
  return jnp.mean(jnp.stack(losses))


# ---------------------------------------------------------------------------------------
# Aux-loss-free balancing (Hy3 / DeepSeek-V3): the selection-only bias moves toward balance
# ---------------------------------------------------------------------------------------
def update_expert_bias(params, load_by_group: dict, cfg: ModelConfig, rate: float):
  """expert_bias += rate * sign(mean load - load), per layer, outside the optimizer."""
  if not cfg.router_bias or rate <= 0:
    return params
  params = dict(params)
  for i, (pattern, _) in enumerate(cfg.layer_groups()):
    key = f"groups_{i}"
    if key not in load_by_group:
      continue
    group = dict(params[key])
    moe_layers = [j for j, spec in enumerate(pattern) if spec.ffn == "moe"]
    frac_rpe = load_by_group[key]                    # [repeats, moe layers in pattern, E]
    for p, j in enumerate(moe_layers):
      layer = dict(group[f"layer_{j}"])
      moe = dict(layer["moe"])
      frac_re = frac_rpe[:, p]
      nudge = rate * jnp.sign(jnp.mean(frac_re, -1, keepdims=True) - frac_re)
      moe["expert_bias"] = moe["expert_bias"] + nudge.astype(moe["expert_bias"].dtype)
      layer["moe"] = moe
      group[f"layer_{j}"] = layer
    params[key] = group
  return params


# ---------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------
def _microbatches(batch: dict, num_micro: int) -> dict:
  """[B, T] -> [A, B/A, T], microbatch a = rows a, a+A, ... so each spreads over every device."""
  def split(x):
    b = x.shape[0]
    return x.reshape(b // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def train_step(state: dict, batch: dict, *, cfg: ModelConfig, moe: MoETrainConfig,
               tx: optax.GradientTransformation, lr_fn: Callable, num_micro: int,
               mesh: Mesh | None = None):
  params = state["params"]
  num_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
  grad_fn = jax.value_and_grad(
      functools.partial(loss_fn, cfg=cfg, moe=moe, num_micro=num_micro), has_aux=True)

  with moe_parallel.use_mesh(mesh):
    if num_micro == 1:
      (_, aux), grads = grad_fn(params, batch, num_tokens)
    else:
      def micro(acc, mb):
        (_, a), g = grad_fn(params, mb, num_tokens)
        return jax.tree.map(jnp.add, acc, (g, a)), None
      mbs = _microbatches(batch, num_micro)
      zero_aux = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], mbs),
                                                num_tokens)[0][1])
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (params, zero_aux))
      (grads, aux), _ = jax.lax.scan(micro, zeros, mbs)
      aux = {k: v if k == "ce_sum" else v / num_micro for k, v in aux.items()}
    load_groups = _load_by_group(aux["load"], cfg)

  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  new_params = update_expert_bias(new_params, load_groups, cfg, moe.bias_update_rate)

  ce = aux["ce_sum"] / num_tokens
  loss = ce + moe.aux_loss_weight * aux["aux_loss"] + moe.z_loss_weight * aux["z_loss"]
  if "mtp_loss" in aux:
    loss = loss + moe.mtp_loss_weight * aux["mtp_loss"]
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jnp.where(finite, new, old)
  new_state = {"step": state["step"] + finite.astype(state["step"].dtype),
               "params": jax.tree.map(keep, new_params, params),
               "opt_state": jax.tree.map(keep, opt_state, state["opt_state"])}
  metrics = {"loss": ce, "total_loss": loss, "aux_loss": aux["aux_loss"], "z_loss": aux["z_loss"],
             "dropped_frac": aux["dropped_frac"], "grad_norm": grad_norm,
             "lr": lr_fn(state["step"]), "load": aux["load"], "tokens": num_tokens,
             "finite": finite}
  if "mtp_loss" in aux:
    metrics["mtp_loss"] = aux["mtp_loss"]
  return new_state, metrics


def _load_by_group(load_le: jax.Array, cfg: ModelConfig) -> dict:
  """Inverse of moe_losses' concatenation: {"groups_i": [repeats, moe per pattern, E]}."""
  out, start = {}, 0
  for i, (pattern, repeats) in enumerate(cfg.layer_groups()):
    per = sum(spec.ffn == "moe" for spec in pattern)
    if per:
      out[f"groups_{i}"] = load_le[start:start + repeats * per].reshape(repeats, per, -1)
      start += repeats * per
  return out


# ---------------------------------------------------------------------------------------
# Shardings, init and the jitted step
# ---------------------------------------------------------------------------------------
def _key_str(path) -> tuple[str, ...]:
  return tuple(str(k) for k in path)


def state_shardings(abstract_state: dict, cfg: ModelConfig, mesh: Mesh) -> dict:
  """Params by the logical rules; each optimizer leaf like the param it mirrors (by path suffix)."""
  p_sh = param_shardings(cfg, mesh)
  by_path = {}
  for (path, sh), leaf in zip(jax.tree_util.tree_flatten_with_path(p_sh)[0],
                              jax.tree.leaves(abstract_state["params"])):
    by_path[_key_str(path)] = (leaf.shape, sh)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = _key_str(path)
    for i in range(len(keys)):
      hit = by_path.get(keys[i:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return replicated

  opt_sh = jax.tree_util.tree_map_with_path(pick, abstract_state["opt_state"])
  return {"step": replicated, "params": p_sh, "opt_state": opt_sh}


def fresh_state(cfg: ModelConfig, tx, rng=None, params=None) -> dict:
  """A new state from `rng` (or from `params`, with a fresh optimizer); traceable."""
  if params is None:
    params = init_params(cfg, rng)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def init_state(cfg: ModelConfig, tx, rng, shardings=None, params=None) -> dict:
  """`fresh_state` created directly in its shardings."""
  if params is None:
    return jax.jit(lambda r: fresh_state(cfg, tx, r), out_shardings=shardings)(rng)
  return jax.jit(lambda p: fresh_state(cfg, tx, params=p), out_shardings=shardings)(params)


def batch_shardings(mesh: Mesh, keys=BATCH_KEYS) -> dict:
  return {k: batch_sharding(mesh) for k in keys}


def jit_train_step(cfg: ModelConfig, moe: MoETrainConfig, tx, lr_fn, num_micro: int, mesh: Mesh,
                   state_sh: dict, batch_keys=BATCH_KEYS):
  fn = functools.partial(train_step, cfg=cfg, moe=moe, tx=tx, lr_fn=lr_fn, num_micro=num_micro,
                         mesh=mesh)
  return jax.jit(fn, in_shardings=(state_sh, batch_shardings(mesh, batch_keys)),
                 out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))


def abstract_state(cfg: ModelConfig, tx) -> Any:
  """ShapeDtypeStructs of the state, without allocating it."""
  return jax.eval_shape(lambda: fresh_state(cfg, tx, jax.random.key(0)))

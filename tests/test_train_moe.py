"""MoE training features: each test checks the one thing the feature must change."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas as kp
from hunyuan_jax.config import ModelConfig
from hunyuan_jax.model.moe import (capacity_keep_mask, expert_capacity, moe_ffn,
                                   recycle_over_capacity, router_spec)
from hunyuan_jax.train import optimizer as opt_lib
from hunyuan_jax.train.run_config import OptimConfig
from hunyuan_jax.train.step import moe_losses, update_expert_bias
from hunyuan_jax.model.moe import MoEStats

T, H, E, K = 256, 16, 8, 2


def _cfg(**kw):
  base = dict(family="a13b", vocab_size=64, hidden_size=H, num_layers=1, num_heads=2, num_kv_heads=1,
              head_dim=8, intermediate_size=16, mlp_layer_types=("moe",), num_experts=E,
              moe_top_k=(K,), moe_intermediate_size=(8,), shared_expert_size=(0,),
              dtype="float32", param_dtype="float32")
  base.update(kw)
  return ModelConfig(**base)


def _skewed_router(seed=0, skew=2.0):
  """Tokens and a router that sends most tokens to experts 0 and 1."""
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (T, H))
  w = 0.3 * jax.random.normal(kw, (H, E))
  w = w.at[:, :2].add(skew * jnp.mean(x, 0)[:, None] / jnp.linalg.norm(jnp.mean(x, 0)) ** 2)
  return x, w


def _stats(x, w, bias=None, top_k=K, scoring="softmax"):
  r = kp.route(x, w, bias, kp.RouterSpec(top_k=top_k, scoring=scoring))
  return r, MoEStats(r.expert_frac_e[None], r.mean_prob_e[None], r.z_loss[None], jnp.zeros((1,)))


def test_aux_loss_gradient_balances_a_toy_router():
  x, w = _skewed_router()
  aux = lambda w: moe_losses({"groups_0": _stats(x, w)[1]})["aux_loss"]
  before = float(jnp.max(_stats(x, w)[0].expert_frac_e))
  grad = jax.jit(jax.grad(aux))
  for _ in range(40):
    w = w - 20.0 * grad(w)
  after = float(jnp.max(_stats(x, w)[0].expert_frac_e))
  assert before > 0.25, before           # the toy really is imbalanced (balanced: 1/E = 0.125)
  assert after < 0.6 * before, (before, after)


def test_z_loss_gradient_shrinks_router_logits():
  x, w = _skewed_router()
  w = 4.0 * w
  z = lambda w: moe_losses({"groups_0": _stats(x, w)[1]})["z_loss"]
  before = float(z(w))
  grad = jax.jit(jax.grad(z))
  for _ in range(20):
    w = w - 3e-2 * grad(w)
  assert float(z(w)) < 0.5 * before, (before, float(z(w)))


def _moe_out(cfg, x, w):
  kw = jax.random.split(jax.random.key(3), 2)
  wi = 0.2 * jax.random.normal(kw[0], (E, H, 2, 8))
  wo = 0.2 * jax.random.normal(kw[1], (E, 8, H))
  return moe_ffn(x, w, None, wi, wo, cfg=cfg, top_k=K, dtype=jnp.float32)


def test_capacity_drops_assignments_of_overloaded_experts():
  x, w = _skewed_router()
  experts = kp.route(x, w, None, router_spec(_cfg(), K)).experts_tk
  keep = capacity_keep_mask(experts, E, 1.0)
  cap = expert_capacity(T, K, E, 1.0)
  kept_per_expert = np.bincount(np.asarray(experts)[np.asarray(keep)], minlength=E)
  assert kept_per_expert.max() <= cap
  _, stats = _moe_out(_cfg(moe_capacity_factor=1.0), x, w)
  _, stats_dropless = _moe_out(_cfg(), x, w)
  assert float(stats.dropped_frac) > 0.1 and float(stats_dropless.dropped_frac) == 0.0


def test_recycling_reroutes_instead_of_dropping():
  x, w = _skewed_router()
  experts = kp.route(x, w, None, router_spec(_cfg(), K)).experts_tk
  cap = expert_capacity(T, K, E, 1.0)
  assert E * cap >= T * K                       # total capacity suffices...
  new_experts, keep = recycle_over_capacity(experts, E, 1.0)
  assert bool(jnp.all(keep))                    # ...so nothing is dropped
  counts = np.bincount(np.asarray(new_experts).ravel(), minlength=E)
  assert counts.max() <= cap                    # and no expert goes over its capacity
  kept_first = np.asarray(capacity_keep_mask(experts, E, 1.0))
  np.testing.assert_array_equal(np.asarray(new_experts)[kept_first], np.asarray(experts)[kept_first])
  assert (np.asarray(new_experts) != np.asarray(experts)).sum() == (~kept_first).sum()
  # Through the layer: no drop, and the output differs from plain capacity dropping.
  y_rec, s_rec = _moe_out(_cfg(moe_capacity_factor=1.0, moe_expert_recycling=True), x, w)
  y_drop, _ = _moe_out(_cfg(moe_capacity_factor=1.0), x, w)
  assert float(s_rec.dropped_frac) == 0.0
  assert float(jnp.max(jnp.abs(y_rec - y_drop))) > 1e-3


def test_recycling_config_needs_a_capacity():
  with pytest.raises(ValueError, match="moe_capacity_factor"):
    _cfg(moe_expert_recycling=True)


def test_expert_lr_scale_changes_only_routed_expert_updates():
  cfg = _cfg(shared_expert_size=(8,))
  from hunyuan_jax.model import init_params
  params = init_params(cfg, jax.random.key(0))
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.01, params)

  def updates(scale, shared):
    o = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1, clip_norm=0.0,
                    expert_lr_scale=scale, shared_expert_lr_scale=shared)
    tx, _ = opt_lib.make_optimizer(o, cfg, params, total_steps=10)
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return u

  base, scaled = updates(1.0, 1.0), updates(0.25, 1.0)
  flat_b = jax.tree_util.tree_flatten_with_path(base)[0]
  for (path, ub), us in zip(flat_b, jax.tree.leaves(scaled)):
    group = opt_lib.param_group(path)
    ratio = 0.25 if group == "routed_expert" else 1.0
    np.testing.assert_allclose(np.asarray(us), ratio * np.asarray(ub), rtol=1e-6, err_msg=str(path))
  groups = {opt_lib.param_group(p) for p, _ in flat_b}
  assert {"routed_expert", "shared_expert", "default"} <= groups
  auto = opt_lib.expert_lr_scale(OptimConfig(expert_lr_scale="auto"), cfg)
  assert auto == pytest.approx((K / E) ** 0.5)


def test_aux_free_bias_moves_toward_balance():
  cfg = _cfg(router_bias=True, router_scoring="sigmoid", router_scale=2.5, router_eps=1e-20)
  x, w = _skewed_router(skew=3.0)
  params = {"groups_0": {"layer_0": {"moe": {"expert_bias": jnp.zeros((1, E), jnp.float32)}}}}
  loads = []
  for _ in range(60):
    bias = params["groups_0"]["layer_0"]["moe"]["expert_bias"][0]
    frac = kp.route(x, w, bias, router_spec(cfg, K)).expert_frac_e
    loads.append(float(jnp.max(frac)))
    params = update_expert_bias(params, {"groups_0": frac[None, None]}, cfg, rate=0.01)
  bias = np.asarray(params["groups_0"]["layer_0"]["moe"]["expert_bias"][0])
  assert loads[0] > 0.25, loads[0]
  # Sign steps make the load oscillate around balance: judge the late average.
  assert np.mean(loads[-20:]) < 0.7 * loads[0], (loads[0], loads[-20:])
  assert bias[:2].max() < 0 < bias[2:].max()    # overloaded experts pushed down, others up


def test_mtp_loss_trains_only_when_weighted():
  """Hy3 MTP: with a weight the MTP layer gets gradients and the loss grows by weight x MTP CE."""
  from tiny_configs import tiny  # tests/ is on sys.path (pytest rootdir-relative imports)
  from hunyuan_jax.model import init_params
  from hunyuan_jax.train.run_config import MoETrainConfig
  from hunyuan_jax.train.step import loss_fn
  cfg = tiny("hy3", num_layers=2)
  params = init_params(cfg, jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "positions": jnp.broadcast_to(jnp.arange(8), (2, 8)),
           "segment_ids": jnp.ones((2, 8), jnp.int32), "loss_mask": jnp.ones((2, 8), jnp.float32)}
  results = {}
  for weight in (0.0, 0.5):
    moe = MoETrainConfig(aux_loss_weight=0.0, z_loss_weight=0.0, mtp_loss_weight=weight)
    fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, jnp.float32(16), cfg=cfg, moe=moe,
                                                      num_micro=1), has_aux=True))
    results[weight] = fn(params)
  (loss0, aux0), grads0 = results[0.0]
  (loss1, aux1), grads1 = results[0.5]
  assert "mtp_loss" not in aux0 and float(aux1["mtp_loss"]) > 0
  np.testing.assert_allclose(loss1 - loss0, 0.5 * aux1["mtp_loss"], rtol=1e-5)
  assert not np.any(np.asarray(grads0["mtp_0"]["eh_proj"]))
  assert np.any(np.asarray(grads1["mtp_0"]["eh_proj"]))

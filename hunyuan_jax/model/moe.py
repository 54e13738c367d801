"""Mixture-of-Experts FFN: router, dropless sort + grouped matmul, shared expert, combine.

    x [T, H] -> route (fp32) -> weights [T, k], experts [T, k], sort order, group sizes
             -> gather rows by expert -> gmm(W_gate_up [E, H, 2I]) + SwiGLU -> gmm(W_down [E, I, H])
             -> unsort, weighted sum over k -> + shared expert -> y [T, H]

`moe_ffn` is a pure function of local tokens, so expert/data parallel wrappers (shard_map)
can call it per shard. The optional capacity mode reproduces the Tencent remote code's
token dropping (HUNYUAN_SPEC.md 2.7); the default is dropless, like transformers and vLLM.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

import kernels_pallas as kp
from hunyuan_jax.config import LayerSpec, ModelConfig
from hunyuan_jax.model import moe_parallel
from hunyuan_jax.model.layers import SwiGLU, compute_dtype, param, swiglu
from hunyuan_jax.quant import fp8

# checkpoint_name of the routed experts' gate+up output: jax's checkpoint_dots policy does not
# see it (a Pallas call, not a dot_general), so the "dots" remat policy names it.
EXPERT_GATE_UP = "moe_expert_gate_up"


class MoEStats(NamedTuple):
  """Per-layer router statistics for the auxiliary losses and load logging."""
  expert_frac_e: jax.Array   # fraction of kept assignments per expert
  mean_prob_e: jax.Array     # mean router probability per expert
  z_loss: jax.Array          # mean logsumexp(logits)^2
  dropped_frac: jax.Array    # fraction of assignments dropped by the capacity limit


def router_spec(cfg: ModelConfig, top_k: int) -> kp.RouterSpec:
  return kp.RouterSpec(top_k=top_k, scoring=cfg.router_scoring, renormalize=cfg.router_renormalize,
                       scale=cfg.router_scale, eps=cfg.router_eps)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  return max(top_k, int(capacity_factor * top_k * num_tokens / num_experts))


def capacity_keep_mask(experts_tk: jax.Array, num_experts: int, capacity_factor: float) -> jax.Array:
  """Tencent `topkgating` priority: assignments visited j-major then token, kept while slot < cap.

  cap = max(k, floor(capacity_factor * k * T / E)); capacity_factor 1.0 reproduces the reference.
  """
  t, k = experts_tk.shape
  cap = expert_capacity(t, k, num_experts, capacity_factor)
  onehot_kte = jax.nn.one_hot(experts_tk.T, num_experts, dtype=jnp.int32)      # [k, T, E]
  slot_kte = jnp.cumsum(onehot_kte.reshape(k * t, num_experts), axis=0).reshape(k, t, num_experts) - 1
  slot_kt = jnp.sum(slot_kte * onehot_kte, axis=-1)
  return (slot_kt < cap).T                                                        # [T, k]


def recycle_over_capacity(experts_tk: jax.Array, num_experts: int,
                          capacity_factor: float) -> tuple[jax.Array, jax.Array]:
  """Hunyuan-Large expert recycling: over-capacity assignments move to experts with spare slots.

  Overflowing assignments (in the capacity priority order) take the free slots round-robin over
  experts (every expert's first free slot, then every second, ...), so nothing is dropped while
  E * cap >= T * k. The report re-routes at random; round-robin is the deterministic version.
  A moved assignment keeps its gate weight; with top-k > 1 it may land on an expert the token
  already uses. Returns (experts_tk after recycling, keep_tk).
  """
  t, k = experts_tk.shape
  cap = expert_capacity(t, k, num_experts, capacity_factor)
  keep_tk = capacity_keep_mask(experts_tk, num_experts, capacity_factor)
  kept_e = jnp.bincount(jnp.where(keep_tk, experts_tk, num_experts).reshape(-1),
                        length=num_experts + 1)[:num_experts]
  spare_e = cap - kept_e
  free_ce = jnp.arange(cap)[:, None] < spare_e[None, :]                   # slot c of expert e is free
  slot_order = jnp.argsort(~free_ce.reshape(-1), stable=True)             # free slots first, c-major
  slot_expert = (slot_order % num_experts).astype(experts_tk.dtype)
  over_kt = ~keep_tk.T
  rank_kt = jnp.cumsum(over_kt.reshape(-1)).reshape(k, t) - 1             # overflow index, priority order
  moved_kt = over_kt & (rank_kt < jnp.sum(free_ce))
  new_kt = jnp.where(moved_kt, slot_expert[jnp.clip(rank_kt, 0, cap * num_experts - 1)], experts_tk.T)
  return new_kt.T, keep_tk | moved_kt.T


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def take_rows(x_nd: jax.Array, perm_m: jax.Array, inverse_m: jax.Array, fan_out: int) -> jax.Array:
  """y[m] = x[perm[m] // fan_out], perm a permutation of range(n * fan_out), inverse its inverse.

  The backward is a gather as well (g[inverse], summed over the fan_out copies of each row);
  jnp.take's own backward is a scatter-add, which XLA runs with atomics.
  """
  return jnp.take(x_nd, perm_m // fan_out, axis=0)


def _take_rows_fwd(x_nd, perm_m, inverse_m, fan_out):
  return take_rows(x_nd, perm_m, inverse_m, fan_out), inverse_m


def _take_rows_bwd(fan_out, inverse_m, g_md):
  g = jnp.take(g_md, inverse_m, axis=0)
  if fan_out > 1:
    g = jnp.sum(g.reshape(-1, fan_out, g.shape[-1]).astype(jnp.float32), axis=1).astype(g_md.dtype)
  return g, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def down_combine(act_mf, wo_efd, group_sizes, sort_idx, inverse, weights_tk, top_k, backend):
  """y[t] = sum_k weights[t, k] * (act @ W_down[e])[slot (t, k)], in fp32.

  The backward needs act but not the down projection's output: d weights[t, k] =
  <dy[t], act[m] @ W_e> = <dy[t] @ W_e^T, act[m]>, so the same dx-form gmm that gives d act
  (unweighted) gives it too. A remat'd layer then never recomputes the down gmm.
  """
  t = weights_tk.shape[0]
  y_sorted_md = kp.gmm(act_mf, wo_efd, group_sizes, backend=backend)
  y_tkd = take_rows(y_sorted_md, inverse, sort_idx, 1).reshape(t, top_k, -1)
  return jnp.einsum("tkd,tk->td", y_tkd.astype(jnp.float32), weights_tk)


def _down_combine_fwd(act_mf, wo_efd, group_sizes, sort_idx, inverse, weights_tk, top_k, backend):
  y = down_combine(act_mf, wo_efd, group_sizes, sort_idx, inverse, weights_tk, top_k, backend)
  return y, (act_mf, wo_efd, group_sizes, sort_idx, inverse, weights_tk)


def _down_combine_bwd(top_k, backend, res, dy_td):
  act_mf, wo_efd, group_sizes, sort_idx, inverse, weights_tk = res
  dt = act_mf.dtype
  dy_md = take_rows(dy_td.astype(dt), sort_idx, inverse, top_k)         # unweighted, sorted rows
  w_m = jnp.take(weights_tk.reshape(-1), sort_idx).astype(jnp.float32)
  u_mf = kp.gmm(dy_md, wo_efd, group_sizes, transpose_rhs=True,
                backend=backend).astype(jnp.float32)                   # dy @ W_e^T, unweighted
  dw_m = jnp.sum(u_mf * act_mf.astype(jnp.float32), axis=-1)
  d_weights = jnp.take(dw_m, inverse).reshape(weights_tk.shape).astype(weights_tk.dtype)
  d_act = (u_mf * w_m[:, None]).astype(dt)
  d_wo = kp.tgmm((act_mf.astype(jnp.float32) * w_m[:, None]).astype(dt), dy_md, group_sizes,
                 out_dtype=wo_efd.dtype, backend=backend)
  return d_act, d_wo, None, None, None, d_weights


down_combine.defvjp(_down_combine_fwd, _down_combine_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gate_up(x_md, wi_ed2f, group_sizes, backend):
  """silu(x @ W_gate) * (x @ W_up) for rows sorted by expert (W's columns: [gate | up]).

  Without differentiation (serving) it is one fused gmm whose epilogue applies SwiGLU: the
  [M, 2F] product is never written (H100, A13B up: 6% faster than gmm + SwiGLU). Under
  differentiation the forward keeps the product, named for remat, and the backward uses it,
  so training never reruns the gate+up gmm.
  """
  return kp.gmm_swiglu(x_md, wi_ed2f, group_sizes, backend=backend)


def _gate_up_fwd(x_md, wi_ed2f, group_sizes, backend):
  h_mf2 = checkpoint_name(kp.gmm(x_md, wi_ed2f, group_sizes, backend=backend), EXPERT_GATE_UP)
  return _swiglu_2f(h_mf2), (x_md, wi_ed2f, group_sizes, h_mf2)


def _gate_up_bwd(backend, res, d_act_mf):
  x_md, wi_ed2f, group_sizes, h_mf2 = res
  _, vjp = jax.vjp(_swiglu_2f, h_mf2)
  dh_mf2, = vjp(d_act_mf)
  dx = kp.gmm(dh_mf2, wi_ed2f, group_sizes, transpose_rhs=True, backend=backend)
  dw = kp.tgmm(x_md, dh_mf2, group_sizes, out_dtype=wi_ed2f.dtype, backend=backend)
  return dx, dw, None


def _swiglu_2f(h_mf2):
  return swiglu(h_mf2.reshape(h_mf2.shape[0], 2, -1))


gate_up.defvjp(_gate_up_fwd, _gate_up_bwd)


def _local_groups(experts_tk: jax.Array, expert_offset, num_local: int):
  """Sort order and group sizes for the experts [offset, offset + num_local) held here.

  Assignments to other experts sort last, past sum(group_sizes), where gmm gives 0.
  """
  local_m = experts_tk.reshape(-1) - expert_offset
  key_m = jnp.where((local_m >= 0) & (local_m < num_local), local_m, num_local).astype(jnp.int32)
  sort_idx = kp.expert_order(key_m, num_local + 1)
  group_sizes = jnp.bincount(key_m, length=num_local + 1)[:num_local].astype(jnp.int32)
  return sort_idx, group_sizes


def moe_ffn(x_td: jax.Array, w_router_de: jax.Array, bias_e: Optional[jax.Array],
            wi_edkf: jax.Array, wo_efd: jax.Array, *, cfg: ModelConfig, top_k: int,
            dtype, expert_offset=0) -> tuple[jax.Array, MoEStats]:
  """Routed experts only (no shared expert): returns y [T, H] in fp32 and router stats.

  wi/wo may hold a slice of the experts, [expert_offset, expert_offset + E_local) of the router's
  E (expert parallelism, see moe_parallel.py); assignments to other experts then contribute 0.
  They may also be the serving layout's fp8 experts (quant.fp8.Fp8Weight, q [E, 2, F, H] and
  [E, H, F]): then a serving op, with no backward.
  """
  t, d = x_td.shape
  e = w_router_de.shape[1]
  quantized = fp8.is_quantized(wi_edkf)
  if quantized:
    e_local, _, f, _ = wi_edkf.q.shape
    wi_fp8 = fp8.Fp8Weight(wi_edkf.q.reshape(e_local, 2 * f, d), wi_edkf.scale.reshape(e_local, 2 * f))
  else:
    e_local, _, _, f = wi_edkf.shape
  r = kp.route(x_td, w_router_de, bias_e, router_spec(cfg, top_k))
  weights_tk, experts_tk = r.weights_tk, r.experts_tk
  group_sizes, sort_idx, inverse = r.group_sizes_e, r.sort_idx_m, r.slot_pos_m
  dropped = jnp.zeros((), jnp.float32)
  if cfg.moe_capacity_factor > 0:
    if cfg.moe_expert_recycling:
      experts_tk, keep_tk = recycle_over_capacity(experts_tk, e, cfg.moe_capacity_factor)
    else:
      keep_tk = capacity_keep_mask(experts_tk, e, cfg.moe_capacity_factor)
    weights_tk = jnp.where(keep_tk, weights_tk, 0.0)
    dropped = 1.0 - jnp.mean(keep_tk.astype(jnp.float32))
  if e_local != e or cfg.moe_expert_recycling:
    sort_idx, group_sizes = _local_groups(experts_tk, expert_offset, e_local)
    inverse = kp.inverse_permutation(sort_idx)
  # Weights follow the reference's dtype path: the remote code and transformers cast them to the
  # activation dtype before the combine; Hy3 keeps its fp32 combine.
  if not cfg.moe_fp32_combine:
    weights_tk = weights_tk.astype(dtype).astype(jnp.float32)
  backend = None if cfg.moe_impl == "auto" else cfg.moe_impl   # e.g. "reference" to force jnp ops
  if t == 1 and e_local == e and not cfg.moe_expert_recycling:
    # One token (batch-1 decode): its k experts are distinct, so its k slots go to the
    # experts in pick order; no sort, schedule or gather (about 10 fewer kernels per layer).
    experts_k = experts_tk.reshape(-1)
    x_kd = jnp.broadcast_to(x_td.astype(dtype), (top_k, d))
    if quantized:
      h_kf2 = fp8.expert_gmv(x_kd, wi_fp8, experts_k, backend)
      y_kd = fp8.expert_gmv(swiglu(h_kf2.reshape(-1, 2, f)), wo_efd, experts_k, backend)
    else:
      h_kf2 = kp.gmv(x_kd, wi_edkf.astype(dtype).reshape(e, d, 2 * f), experts_k, backend=backend)
      y_kd = kp.gmv(swiglu(h_kf2.reshape(-1, 2, f)), wo_efd.astype(dtype), experts_k, backend=backend)
    y_td = jnp.einsum("kd,k->d", y_kd.astype(jnp.float32), weights_tk[0])[None]
    return y_td, MoEStats(r.expert_frac_e, r.mean_prob_e, r.z_loss, dropped)
  x_sorted_md = take_rows(x_td.astype(dtype), sort_idx, inverse, top_k)
  stats = MoEStats(r.expert_frac_e, r.mean_prob_e, r.z_loss, dropped)
  if quantized:
    act_mf = swiglu(fp8.expert_gmm(x_sorted_md, wi_fp8, group_sizes, backend).reshape(-1, 2, f))
    y_sorted_md = fp8.expert_gmm(act_mf, wo_efd, group_sizes, backend)
    y_tkd = take_rows(y_sorted_md, inverse, sort_idx, 1).reshape(t, top_k, -1)
    return jnp.einsum("tkd,tk->td", y_tkd, weights_tk), stats
  act_mf = gate_up(x_sorted_md, wi_edkf.astype(dtype).reshape(e_local, d, 2 * f), group_sizes,
                   backend)
  y_td = down_combine(act_mf, wo_efd.astype(dtype), group_sizes, sort_idx, inverse, weights_tk,
                      top_k, backend)
  return y_td, stats


class MoE(nn.Module):
  cfg: ModelConfig
  spec: LayerSpec

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> tuple[jax.Array, MoEStats]:
    cfg, spec, dt = self.cfg, self.spec, compute_dtype(self.cfg)
    pdt = jnp.dtype(cfg.param_dtype)
    h, e, f = cfg.hidden_size, cfg.num_experts, spec.ffn_size
    w_router = param(self, "router", (h, e), ("embed", None), pdt, fan_in=h)
    bias = None
    if cfg.router_bias:  # fp32 like the reference buffer; updated outside the optimizer in training
      bias = param(self, "expert_bias", (e,), (None,), jnp.float32, init=nn.initializers.zeros)
    if self.has_variable("params", "wi_fp8"):   # serving layout (quant.fp8.quantize_experts)
      get = functools.partial(self.get_variable, "params")
      wi = fp8.Fp8Weight(get("wi_fp8"), get("wi_scale"))
      wo = fp8.Fp8Weight(get("wo_fp8"), get("wo_scale"))
    else:
      wi = param(self, "wi", (e, h, 2, f), ("experts", "embed", None, "mlp"), pdt, fan_in=h)
      wo = param(self, "wo", (e, f, h), ("experts", "mlp", "embed"), pdt, fan_in=f)
    b, s, _ = x_btd.shape
    shared = SwiGLU(cfg, spec.shared_size, name="shared") if spec.shared_size else None
    mesh = moe_parallel.active_mesh()
    if mesh is not None:  # a train/serve step traced under moe_parallel.use_mesh: per-shard dispatch
      y, stats = moe_parallel.moe_ffn_sharded(
          x_btd, w_router, bias, wi, wo, mesh=mesh, cfg=cfg, top_k=spec.top_k, dtype=dt,
          shared=(shared.wi, shared.wo) if shared else None)
      return y.astype(dt), stats   # routed + shared, summed in fp32
    y_td, stats = moe_ffn(x_btd.reshape(b * s, h), w_router, bias, wi, wo, cfg=cfg,
                          top_k=spec.top_k, dtype=dt)
    y = y_td.reshape(b, s, h)
    if shared:
      shared = shared(x_btd)
      if cfg.moe_fp32_combine:
        return (y + shared.astype(jnp.float32)).astype(dt), stats
      return y.astype(dt) + shared, stats
    return y.astype(dt), stats

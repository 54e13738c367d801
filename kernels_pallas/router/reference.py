"""Pure-jnp top-k router with the outputs the dispatcher and the aux losses need."""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class RouterSpec(NamedTuple):
  """Static routing rule.

  scoring: "softmax" (A13B, Large) or "sigmoid" (Hy3).
  renormalize: divide the k selected scores by their sum (A13B, Hy3; not Large's top-1).
  scale: multiply the final weights (Hy3: 2.826).
  eps: added to the renormalisation denominator (Hy3: 1e-20; softmax path: clamp at f32 eps).
  """
  top_k: int
  scoring: str = "softmax"
  renormalize: bool = True
  scale: float = 1.0
  eps: float = 0.0


class Routing(NamedTuple):
  weights_tk: jax.Array      # f32 combine weights of the selected experts
  experts_tk: jax.Array      # int32 expert ids, ordered by score (ties: lower id first)
  sort_idx_m: jax.Array      # int32 [T*k]: flat assignment ids (t*k+j) in expert order, stable
  slot_pos_m: jax.Array      # int32 [T*k]: each assignment's place in that order (the inverse)
  group_sizes_e: jax.Array   # int32 [E]: assignments per expert
  expert_frac_e: jax.Array   # f32 [E]: fraction of assignments per expert (sums to 1)
  mean_prob_e: jax.Array     # f32 [E]: mean normalised router probability per expert
  z_loss: jax.Array          # f32 []: mean over tokens of logsumexp(logits)^2


def expert_order(experts_m: jax.Array, num_experts: int, method: str = "auto") -> jax.Array:
  """Stable argsort of the flat expert ids: assignment ids in expert order."""
  num_slots = experts_m.shape[0]
  if method == "auto":
    method = "key_sort" if num_experts * num_slots < 2**31 else "argsort"
  if method == "argsort":
    return jnp.argsort(experts_m, stable=True).astype(jnp.int32)
  # One sort of 32-bit keys, expert-major and slot-minor: unique, so the order is stable.
  keys_m = experts_m * num_slots + jnp.arange(num_slots, dtype=jnp.int32)
  return jax.lax.sort(keys_m) % num_slots


def inverse_permutation(perm_m: jax.Array) -> jax.Array:
  """inv[perm[m]] = m: one scatter with unique indices (no atomics), not a second sort."""
  m = perm_m.shape[0]
  return jnp.zeros((m,), jnp.int32).at[perm_m].set(jnp.arange(m, dtype=jnp.int32),
                                                   unique_indices=True)


def route_reference(x_td, w_gate_de, bias_e: Optional[jax.Array], spec: RouterSpec) -> Routing:
  """fp32 logits -> scores -> top-k (selection may add bias_e) -> weights, sort, stats."""
  logits_te = jnp.dot(x_td.astype(jnp.float32), w_gate_de.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  return route_from_logits(logits_te, bias_e, spec)


def scores_and_probs(logits_te, spec: RouterSpec):
  """(scores that weight the picks, normalised probabilities for the load statistics)."""
  if spec.scoring == "softmax":
    scores_te = jax.nn.softmax(logits_te, axis=-1)
    return scores_te, scores_te
  if spec.scoring == "sigmoid":
    scores_te = jax.nn.sigmoid(logits_te)
    return scores_te, scores_te / jnp.sum(scores_te, axis=-1, keepdims=True)
  raise ValueError(f"RouterSpec.scoring must be 'softmax' or 'sigmoid', got {spec.scoring!r}")


def combine_weights(scores_te, experts_tk, spec: RouterSpec):
  """The picks' scores, renormalised per the family and scaled."""
  weights_tk = jnp.take_along_axis(scores_te, experts_tk, axis=-1)
  if spec.renormalize:
    denom = jnp.sum(weights_tk, axis=-1, keepdims=True) + spec.eps
    if spec.scoring == "softmax":
      denom = jnp.maximum(denom, jnp.finfo(jnp.float32).eps)
    weights_tk = weights_tk / denom
  return weights_tk * spec.scale


def route_from_logits(logits_te, bias_e: Optional[jax.Array], spec: RouterSpec) -> Routing:
  """Everything after the logits; shared by the reference and split backends."""
  num_tokens, num_experts = logits_te.shape
  scores_te, probs_te = scores_and_probs(logits_te, spec)
  select_te = scores_te if bias_e is None else scores_te + bias_e.astype(jnp.float32)
  _, experts_tk = jax.lax.top_k(jax.lax.stop_gradient(select_te), spec.top_k)
  weights_tk = combine_weights(scores_te, experts_tk, spec)
  experts_tk = experts_tk.astype(jnp.int32)
  num_slots = num_tokens * spec.top_k
  sort_idx_m = expert_order(experts_tk.reshape(-1), num_experts)
  onehot_tke = experts_tk[..., None] == jnp.arange(num_experts, dtype=jnp.int32)
  group_sizes_e = jnp.sum(onehot_tke, axis=(0, 1), dtype=jnp.int32)
  expert_frac_e = group_sizes_e.astype(jnp.float32) / num_slots
  mean_prob_e = jnp.mean(probs_te, axis=0)
  z_loss = jnp.mean(jax.nn.logsumexp(logits_te, axis=-1) ** 2)
  sort_idx_m = sort_idx_m.astype(jnp.int32)
  return Routing(weights_tk, experts_tk, sort_idx_m, inverse_permutation(sort_idx_m), group_sizes_e,
                 expert_frac_e, mean_prob_e, z_loss)

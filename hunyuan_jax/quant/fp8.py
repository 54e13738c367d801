"""FP8 routed experts for serving: W8A8 e4m3, dynamic per-row activation scales.

The routed experts are ~96% of A13B's bytes (and of Hy3's), so storing them in e4m3 halves
what a decode step reads and what the model takes on a device: the whole A13B fits one H200.
Attention, the shared expert, norms, embedding and head stay in the model's dtype (vLLM's
`experts_int8` makes the same split).

    weights:     w[e, n, :] ~ q[e, n, :] * scale[e, n]   q e4m3, scale fp32 = absmax / 448
    activations: x[m, :]    ~ x8[m, :] * sx[m]           per row, computed on the fly
    y[m, n] = (x8[m] . q[e(m), n]) * sx[m] * scale[e(m), n]   the dot accumulated in fp32

q is stored contraction-minor ([E, N, K]): fp8 wgmma reads both operands K-major, so the gmm
kernel takes it as `transpose_rhs`. The scales are applied to the kernel's fp32 output, so
SwiGLU runs outside it.

Params layout (`quantize_experts`): an MoE layer's wi [E, H, 2, F] and wo [E, F, H] become
    wi_fp8 [E, 2, F, H], wi_scale [E, 2, F]     (gate and up rows apart: F shards over tensor)
    wo_fp8 [E, H, F],    wo_scale [E, H]
Training and checkpoints never see this layout.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

import kernels_pallas as kp

QUANTIZATIONS = ("none", "fp8")
FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0            # largest finite e4m3fn value
_INV_MAX = np.float32(1 / FP8_MAX)   # scale = absmax * this: XLA folds a constant divide into it, numpy must too
_TINY = 1e-12              # a zero row or channel gets this scale (its values stay 0)


class Fp8Weight(NamedTuple):
  """Experts' weights in e4m3: q [E, N, K] and per-output-channel scales [E, N] (fp32)."""
  q: jax.Array
  scale: jax.Array


def is_quantized(w) -> bool:
  return isinstance(w, Fp8Weight)


def quantize_weight(w_ekn, xp=jnp) -> Fp8Weight:
  """w [E, K, N] (any float dtype) -> Fp8Weight with q [E, N, K]. `xp=np` runs on the host."""
  w = xp.swapaxes(xp.asarray(w_ekn).astype(xp.float32), -1, -2)
  scale = xp.maximum(xp.max(xp.abs(w), axis=-1), _TINY) * _INV_MAX
  q = xp.clip(w / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8)
  return Fp8Weight(q, scale.astype(xp.float32))


def quantize_rows(x_mk):
  """Per-row dynamic scales: (x8 [M, K] e4m3, sx [M] fp32)."""
  x = x_mk.astype(jnp.float32)
  sx = jnp.maximum(jnp.max(jnp.abs(x), axis=-1), _TINY) * _INV_MAX
  return jnp.clip(x / sx[:, None], -FP8_MAX, FP8_MAX).astype(FP8), sx


def expert_gmv(x_mk, w: Fp8Weight, experts_m, backend=None):
  """y[m] = x[m] @ w[experts[m]] in fp32 (the decode form: one row per expert visit)."""
  x8, sx = quantize_rows(x_mk)
  y = kp.gmv(x8, w.q, experts_m, transpose_rhs=True, out_dtype=jnp.float32, backend=backend)
  return y * sx[:, None] * jnp.take(w.scale, experts_m, axis=0)


def expert_gmm(x_mk, w: Fp8Weight, group_sizes_e, backend=None):
  """y[m] = x[m] @ w[e(m)] in fp32 for rows sorted by expert; rows past sum(group_sizes) give 0."""
  m = x_mk.shape[0]
  x8, sx = quantize_rows(x_mk)
  y = kp.gmm(x8, w.q, group_sizes_e, transpose_rhs=True, out_dtype=jnp.float32, backend=backend)
  e = group_sizes_e.shape[0]
  expert_m = jnp.repeat(jnp.arange(e, dtype=jnp.int32), group_sizes_e, total_repeat_length=m)
  return y * sx[:, None] * jnp.take(w.scale, expert_m, axis=0)


# ------------------------------------------------------------------------------------------
# params <-> serving layout
# ------------------------------------------------------------------------------------------
def quantize_layer_experts(wi, wo, xp=jnp) -> dict:
  """One MoE layer's (or a stack's: leading axes kept) wi [.., E, H, 2, F] and wo [.., E, F, H]
  -> {"wi_fp8", "wi_scale", "wo_fp8", "wo_scale"}."""
  wi = xp.asarray(wi)
  wi_e2hf = xp.moveaxis(wi, -2, -3)                  # [.., E, 2, H, F]: K = H, N = F per half
  qi = quantize_weight(wi_e2hf, xp)                  # q [.., E, 2, F, H], scale [.., E, 2, F]
  qo = quantize_weight(xp.asarray(wo), xp)           # q [.., E, H, F], scale [.., E, H]
  return {"wi_fp8": qi.q, "wi_scale": qi.scale, "wo_fp8": qo.q, "wo_scale": qo.scale}


def _per_layer(wi, wo):
  """quantize_layer_experts one layer at a time: the fp32 temporaries of one layer, not all."""
  if wi.ndim == 4:
    return quantize_layer_experts(wi, wo)
  return jax.lax.map(lambda a: _per_layer(*a), (wi, wo))


def serving_shardings(wi_sharding, wo_sharding, lead: int) -> Optional[dict]:
  """Shardings of the serving arrays from those of wi [.., E, H, 2, F] and wo [.., E, F, H]
  (`lead` stacked layer axes): each axis keeps its mesh axes. None unless both are NamedShardings."""
  pi = tuple(range(lead)) + (lead, lead + 2, lead + 3, lead + 1)   # -> [.., E, 2, F, H]
  po = tuple(range(lead)) + (lead, lead + 2, lead + 1)             # -> [.., E, H, F]
  out = {"wi_fp8": _permuted(wi_sharding, pi), "wi_scale": _permuted(wi_sharding, pi, drop_last=True),
         "wo_fp8": _permuted(wo_sharding, po), "wo_scale": _permuted(wo_sharding, po, drop_last=True)}
  return None if any(v is None for v in out.values()) else out


def _permuted(sharding, perm, drop_last=False):
  """The NamedSharding of a transposed (and maybe reduced) array, or None."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  spec = tuple(sharding.spec) + (None,) * (len(perm) - len(sharding.spec))
  spec = tuple(spec[i] for i in perm)
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*(spec[:-1] if drop_last else spec)))


def quantize_experts(params, quantization: str = "fp8"):
  """Serving params with every MoE layer's routed experts in fp8 (see the module docstring).
  Under a mesh each new array keeps the sharding of the axes it came from. The bf16 experts
  stay referenced by the caller's tree until the caller drops it."""
  if quantization in (None, "", "none"):
    return params
  if quantization != "fp8":
    raise ValueError(f"--quantization={quantization!r} is not supported; use one of {QUANTIZATIONS}")

  def walk(tree):
    if not isinstance(tree, dict):
      return tree
    out = {key: walk(sub) for key, sub in tree.items()}
    if {"wi", "wo", "router"} <= out.keys() and not isinstance(out["wi"], dict):
      wi, wo = out.pop("wi"), out.pop("wo")
      shardings = serving_shardings(getattr(wi, "sharding", None), getattr(wo, "sharding", None),
                                    wi.ndim - 4)
      out.update(jax.jit(_per_layer, out_shardings=shardings)(wi, wo))
    return out

  return walk(params)


def random_fp8_experts(cfg, init_params, key, shardings=None):
  """`init_params(cfg, key)` in the serving layout, the routed experts drawn and quantized one
  layer at a time: the whole model's bf16 experts (A13B: 150 GiB) never exist."""
  def strip(tree):   # jit drops the experts' RNG of the outputs it no longer returns
    if not isinstance(tree, dict):
      return tree
    return {k: strip(v) for k, v in tree.items() if not (k in ("wi", "wo") and "router" in tree)}

  shapes = jax.eval_shape(lambda: init_params(cfg, key))
  params = jax.jit(lambda k: strip(init_params(cfg, k)), out_shardings=strip(shardings) if shardings else None)(key)

  def walk(tree, shape_tree, sharding_tree, key):
    for i, name in enumerate(sorted(tree)):
      if isinstance(tree[name], dict):
        walk(tree[name], shape_tree[name], sharding_tree[name] if sharding_tree else None, jax.random.fold_in(key, i))
    if "router" in tree and "wi" in shape_tree:
      wi, wo = shape_tree["wi"], shape_tree["wo"]
      sh, lead = sharding_tree or {}, wi.ndim - 4

      def one(k, wi_shape, wo_shape):   # one layer, std 1 / sqrt(fan_in) as the model's init
        a, b = jax.random.split(k)
        wi1 = jax.random.normal(a, wi_shape, jnp.bfloat16) * wi_shape[1] ** -0.5
        wo1 = jax.random.normal(b, wo_shape, jnp.bfloat16) * wo_shape[1] ** -0.5
        return quantize_layer_experts(wi1, wo1)

      def draw(k):
        if not lead:
          return one(k, wi.shape, wo.shape)
        return jax.lax.map(lambda k2: one(k2, wi.shape[1:], wo.shape[1:]), jax.random.split(k, wi.shape[0]))

      outs = serving_shardings(sh.get("wi"), sh.get("wo"), lead)
      tree.update(jax.jit(draw, out_shardings=outs)(key))

  walk(params, shapes, shardings, key)
  return params


def host_quantize_layer(wi: np.ndarray, wo: np.ndarray) -> dict:
  """`quantize_layer_experts` on the host (numpy), for loaders that quantize layer by layer."""
  return quantize_layer_experts(wi, wo, xp=np)

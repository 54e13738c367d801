"""Small building blocks: annotated parameters, RMSNorm, RoPE, SwiGLU, fp32-output einsum.

Dtype path follows the PyTorch reference (HUNYUAN_SPEC.md 2.2, 2.5, trap 12): norms compute in
fp32 and cast back before the weight multiply; cos/sin are computed in fp32 and cast to the
activation dtype; parameters are stored in any dtype and cast to the compute dtype at use.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hunyuan_jax.config import ModelConfig

Axes = tuple  # logical axis names, one per parameter dim


def param(module: nn.Module, name: str, shape: tuple[int, ...], axes: Axes, dtype,
          init=None, fan_in: int | None = None) -> jax.Array:
  """Declares a parameter with logical sharding axes (see hunyuan_jax/sharding.py)."""
  if init is None:
    std = 1.0 / math.sqrt(fan_in) if fan_in else 0.02
    init = nn.initializers.normal(std)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def compute_dtype(cfg: ModelConfig):
  return jnp.dtype(cfg.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum with an fp32 result (fp32 accumulation) whose backward runs in the operands' dtype.

  Plain `einsum(preferred_element_type=float32)` hands its backward an fp32 cotangent, so the two
  gradient matmuls promote to fp32: ~4x slower on tensor cores for bf16 operands (the lm_head of
  the A13B train step measured 70.7 ms at 23% of peak). Here the cotangent is rounded to the
  operands' dtype first, as for any bf16 matmul; with fp32 operands nothing changes.
  """
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(spec, a, b):
  return einsum_f32(spec, a, b), (a, b)


def _einsum_f32_bwd(spec, res, g):
  a, b = res
  dt = jnp.result_type(a, b)
  _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=dt), a, b)
  return vjp(g.astype(dt))


einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


# Rows up to which `project` runs as a chunked GEMM (decode batches; prefill and training do not),
# and the chunk counts it tries (the first that leaves >= 64-wide chunks).
FEW_ROWS = 64
CHUNKS = (4, 2)


def project(x: jax.Array, w: jax.Array, n_contract: int = 1, out_dtype=None) -> jax.Array:
  """x @ w over x's last `n_contract` dims and w's first: a dense projection.

  For a few rows (decode) it runs as c chunks of the contraction in one batched GEMM, summed in
  fp32. XLA's GPU simplifier rewrites a plain dot with (N + M) * K < 1e7 into multiply + reduce,
  and for a weight sliced from the layer stack it transposes the weight first, every step: at
  one GPU's share of 2-way tensor parallelism (A13B q, o, shared down) 20 us instead of ~8 for a
  16 MB read (H200). A batched dot is left to cuBLAS, whose 64 x 8 tiles give it c x the CTAs
  of one [M, K] x [K, N] GEMV. One row is doubled: a [1, K] operand also reduced.
  """
  lead, tail = x.shape[:x.ndim - n_contract], w.shape[n_contract:]
  rows, k, n = math.prod(lead), math.prod(w.shape[:n_contract]), math.prod(tail)
  c = next((c for c in CHUNKS if k % (64 * c) == 0), 0)
  if rows > FEW_ROWS or not c:
    return jnp.tensordot(x, w, n_contract, preferred_element_type=out_dtype)
  x_mk = x.reshape(rows, k)
  if rows == 1:
    x_mk = jnp.concatenate([x_mk, x_mk])
  parts = jnp.einsum("mck,ckn->cmn", x_mk.reshape(-1, c, k // c), w.reshape(c, k // c, n),
                     preferred_element_type=jnp.float32)
  dt = out_dtype or jnp.result_type(x, w)
  return jnp.sum(parts, axis=0)[:rows].astype(dt).reshape(lead + tail)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * y.astype(x.dtype)


class RMSNorm(nn.Module):
  cfg: ModelConfig
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = param(self, "scale", (x.shape[-1],), (self.axis_name,), jnp.dtype(self.cfg.param_dtype),
              init=nn.initializers.ones)
    return rms_norm(x, w, self.cfg.rms_norm_eps)


def rope_base(cfg: ModelConfig) -> float:
  """Dynamic-NTK-alpha base, constant at every length (spec 2.5): theta * alpha^(D/(D-2))."""
  if not cfg.rope_alpha:
    return float(cfg.rope_theta)
  d = cfg.head_dim
  return float(cfg.rope_theta) * float(cfg.rope_alpha) ** (d / (d - 2))


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """fp32 inverse frequencies, computed like torch's `base ** (arange/D)` in fp32."""
  d = cfg.head_dim
  exponent = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
  return (np.float32(1.0) / np.power(np.float32(rope_base(cfg)), exponent)).astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """positions [...] -> cos, sin [..., D] in `dtype` (NeoX half-split layout)."""
  theta = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
  emb = jnp.concatenate([theta, theta], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x_btnd: jax.Array, cos_btd: jax.Array, sin_btd: jax.Array) -> jax.Array:
  half = x_btnd.shape[-1] // 2
  rotated = jnp.concatenate([-x_btnd[..., half:], x_btnd[..., :half]], axis=-1)
  cos, sin = cos_btd[:, :, None, :], sin_btd[:, :, None, :]
  return x_btnd * cos + rotated * sin


def swiglu(h_x2f: jax.Array) -> jax.Array:
  """[..., 2, F] (gate, up) -> silu(gate) * up."""
  return jax.nn.silu(h_x2f[..., 0, :]) * h_x2f[..., 1, :]


def swiglu_ffn(x_btd: jax.Array, wi_dkf: jax.Array, wo_fd: jax.Array, dtype,
               out_dtype=None) -> jax.Array:
  """silu(x @ gate) * (x @ up) @ down in `dtype`; out_dtype=float32 keeps a partial sum exact."""
  h = project(x_btd.astype(dtype), wi_dkf.astype(dtype))
  return project(swiglu(h), wo_fd.astype(dtype), out_dtype=out_dtype)


class SwiGLU(nn.Module):
  """Dense SwiGLU FFN with the gate and up kernels fused as [H, 2, F].

  The weights are attributes (setup) so that the MoE can run its shared expert inside the
  routed experts' shard_map and reduce both with one all-reduce."""
  cfg: ModelConfig
  size: int

  def setup(self):
    cfg = self.cfg
    pdt = jnp.dtype(cfg.param_dtype)
    self.wi = param(self, "wi", (cfg.hidden_size, 2, self.size), ("embed", None, "mlp"), pdt,
                    fan_in=cfg.hidden_size)
    self.wo = param(self, "wo", (self.size, cfg.hidden_size), ("mlp", "embed"), pdt,
                    fan_in=self.size)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    return swiglu_ffn(x_btd, self.wi, self.wo, compute_dtype(self.cfg))

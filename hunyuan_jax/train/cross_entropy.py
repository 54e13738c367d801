"""Fused lm-head + cross-entropy: the loss and its gradient without [T, V] fp32 logits in HBM.

The plain path (logits = h @ W in fp32, logsumexp, take_along_axis) measured 70.7 ms for the
A13B head at 4096 tokens on the H100 (23% of the matmul peak): its backward ran fp32 matmuls and
the odd vocabulary (128167) misaligns the tensor-core tiles. Here W is zero-padded to a multiple
of 128 vocabulary rows (padded logits are masked), the matmuls take operands in the compute dtype
with fp32 accumulation, and, because the loss is a scalar, the gradient is formed in the forward
pass chunk by chunk (as Liger's fused linear cross-entropy does): the backward only scales it.

W is vocabulary-major [V, D], the tied embedding's own layout: a [D, V] head cost a 1 GB
transpose each way per microbatch at A13B size (H100 profile, WORKSPACE_NOTES.md Training).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

VOCAB_ALIGN = 128


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _masked_logsumexp(logits_cv: jax.Array, real_v: jax.Array) -> jax.Array:
  """logsumexp over the columns where real_v, in one read of the logits: a single reduction
  of (running max, sum scaled to it) pairs instead of a max pass and then a sum pass."""
  def combine(a, b):
    (m1, s1), (m2, s2) = a, b
    m = jnp.maximum(m1, m2)
    scaled = lambda mi, si: jnp.where(mi == -jnp.inf, 0.0, si * jnp.exp(mi - m))
    return m, scaled(m1, s1) + scaled(m2, s2)
  x = jnp.where(real_v, logits_cv, -jnp.inf)
  m, s = jax.lax.reduce((x, jnp.ones_like(x)), (jnp.float32(-jnp.inf), jnp.float32(0.0)),
                        combine, (1,))
  return m + jnp.log(s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def linear_cross_entropy(h_td: jax.Array, w_vd: jax.Array, targets_t: jax.Array,
                         weights_t: jax.Array, chunk: int = 4096) -> jax.Array:
  """sum_t weights_t * (logsumexp(W h_t) - (W h_t)[target_t]) in fp32.

  h [T, D] and W [V, D] in the compute dtype (bf16 in training); logits accumulate in fp32.
  `chunk` tokens are processed at a time, so peak memory is chunk x V fp32.
  """
  return _loss_and_grads(h_td, w_vd, targets_t, weights_t, chunk)[0]


def _loss_and_grads(h_td, w_vd, targets_t, weights_t, chunk):
  t, d = h_td.shape
  v = w_vd.shape[0]
  vp = _round_up(v, VOCAB_ALIGN)
  c = min(chunk, t)
  tp = _round_up(t, c)
  w = jnp.pad(w_vd, ((0, vp - v), (0, 0)))
  pad_t = lambda x: jnp.pad(x, ((0, tp - t),) + ((0, 0),) * (x.ndim - 1))
  xs = (pad_t(h_td).reshape(tp // c, c, d), pad_t(targets_t).reshape(tp // c, c),
        pad_t(weights_t.astype(jnp.float32)).reshape(tp // c, c))
  real_col = jnp.arange(vp) < v

  def chunk_loss(x):
    h, tgt, wt = x
    logits = jnp.einsum("cd,vd->cv", h, w, preferred_element_type=jnp.float32)
    # The padded columns are masked inside each consumer: a masked copy of the [c, V] fp32
    # logits would be one more HBM pass (1.4 ms per 4096 tokens on the H100).
    lse = _masked_logsumexp(logits, real_col)
    tgt_logit = jnp.take_along_axis(logits, tgt[:, None], axis=-1)[:, 0]
    loss = jnp.sum(wt * (lse - tgt_logit))
    onehot = jnp.arange(vp)[None, :] == tgt[:, None]
    p = jnp.where(real_col, jnp.exp(logits - lse[:, None]), 0.0)
    g = ((p - onehot) * wt[:, None]).astype(h.dtype)
    dh = jnp.einsum("cv,vd->cd", g, w, preferred_element_type=jnp.float32).astype(h.dtype)
    return loss, dh, g

  if tp == c:   # one chunk (the usual 4096-token microbatch): dW leaves the matmul in W's dtype
    loss, dh, g = chunk_loss(jax.tree.map(lambda a: a[0], xs))
    dw = jnp.einsum("cv,cd->vd", g, xs[0][0], preferred_element_type=w.dtype)
    return loss, dh[:t], dw[:v]

  def body(dw_vd, x):
    loss, dh, g = chunk_loss(x)
    return dw_vd + jnp.einsum("cv,cd->vd", g, x[0], preferred_element_type=jnp.float32), (loss, dh)

  dw, (loss_c, dh) = jax.lax.scan(body, jnp.zeros((vp, d), jnp.float32), xs)
  return jnp.sum(loss_c), dh.reshape(tp, d)[:t], dw[:v].astype(w_vd.dtype)


def _fwd(h_td, w_vd, targets_t, weights_t, chunk):
  loss, dh, dw = _loss_and_grads(h_td, w_vd, targets_t, weights_t, chunk)
  return loss, (dh, dw)


def _bwd(chunk, res, g):
  dh, dw = res
  return (g * dh.astype(jnp.float32)).astype(dh.dtype), (g * dw.astype(jnp.float32)).astype(dw.dtype), None, None


linear_cross_entropy.defvjp(_fwd, _bwd)

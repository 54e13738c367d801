"""Simple greedy generation on top of `forward` with a KV cache (one prefill, then a scan).

The serving engine (hunyuan_jax/serve) adds batching, sampling and stop handling; this is the
minimal loop used by the demo, the parity tests and anyone who wants a quick continuation.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hunyuan_jax.config import ModelConfig
from hunyuan_jax.model.transformer import forward, init_cache


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def greedy_generate(params, prompt_bt: jax.Array, *, cfg: ModelConfig, max_new_tokens: int) -> jax.Array:
  """prompt [B, T] (all rows the same length) -> the next `max_new_tokens` tokens [B, N]."""
  b, t = prompt_bt.shape
  cache = init_cache(cfg, b, t + max_new_tokens)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  out = forward(params, prompt_bt, positions, cache, cfg=cfg)
  first = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)

  def step(carry, _):
    token_b, pos, cache = carry
    out = forward(params, token_b[:, None], jnp.full((b, 1), pos), cache, cfg=cfg)
    nxt = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
    return (nxt, pos + 1, out.cache), token_b

  (_, _, _), tokens_nb = jax.lax.scan(step, (first, jnp.int32(t), out.cache), None,
                                      length=max_new_tokens)
  return tokens_nb.T

"""Token sampling for a batch of requests, each row with its own parameters, in one jitted function.

Order (as vLLM and HF): penalties on the raw logits -> greedy rows take the argmax -> temperature
-> top-k -> top-p (on the top-k-renormalised distribution) -> min-p -> categorical draw.
A row with temperature 0 is greedy. top_k <= 0, top_p >= 1 and min_p <= 0 switch a filter off.
The vocabulary sort for top-k/top-p is a static choice (`top_k_top_p`, see `needs_top_k_top_p`),
not a `lax.cond`: on GPU a conditional copies its predicate to the host and waits for it, which
stalled every batch-1 decode step (WORKSPACE_NOTES.md, Inference, ninth session).
Randomness is per row: key = fold_in(fold_in(key(0), seed), step), so a seeded request gives
the same tokens whatever else is in the batch.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1e30


@dataclasses.dataclass
class SamplingParams:
  """What one request asks for (OpenAI names; vLLM extras top_k, min_p, repetition_penalty)."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0   # HF/vLLM: divides positive, multiplies negative logits of seen tokens
  presence_penalty: float = 0.0     # OpenAI: subtracted once from every generated token's logit
  frequency_penalty: float = 0.0    # OpenAI: subtracted per occurrence in the generated text
  seed: Optional[int] = None
  max_tokens: int = 256
  stop: Sequence[str] = ()
  stop_token_ids: Sequence[int] = ()
  ignore_eos: bool = False

  def validate(self) -> None:
    """Raises ValueError naming the field and its allowed range (the server maps it to a 400)."""
    def bad(name, why):
      raise ValueError(f"{name}={getattr(self, name)!r} is invalid: {why}")
    if not 0.0 <= self.temperature <= 100.0:
      bad("temperature", "use a value in [0, 100] (0 = greedy)")
    if not 0.0 < self.top_p <= 1.0:
      bad("top_p", "use a value in (0, 1]")
    if not 0.0 <= self.min_p <= 1.0:
      bad("min_p", "use a value in [0, 1]")
    if self.top_k < -1:
      bad("top_k", "use -1 or 0 (off) or a positive count")
    if not 0.0 < self.repetition_penalty <= 10.0:
      bad("repetition_penalty", "use a value in (0, 10] (1 = off)")
    for name in ("presence_penalty", "frequency_penalty"):
      if not -2.0 <= getattr(self, name) <= 2.0:
        bad(name, "use a value in [-2, 2] (OpenAI's range)")
    if self.max_tokens < 1:
      bad("max_tokens", "ask for at least 1 token")
    if self.seed is not None and not -2**63 <= self.seed < 2**64:
      bad("seed", "use a 64-bit integer")


class SamplingArrays(NamedTuple):
  """Per-row parameters as device arrays [B]."""
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  min_p: jax.Array
  repetition_penalty: jax.Array
  presence_penalty: jax.Array
  frequency_penalty: jax.Array
  seed: jax.Array    # uint32
  step: jax.Array    # uint32: tokens generated so far (the draw index)

  @staticmethod
  def from_params(rows: Sequence[Optional[SamplingParams]], steps: Sequence[int],
                  seeds: Sequence[int]) -> "SamplingArrays":
    """Host-side packing; `None` rows (free slots) get greedy defaults."""
    p = [r or SamplingParams(temperature=0.0) for r in rows]
    f32 = lambda xs: np.asarray(xs, np.float32)
    return SamplingArrays(
        f32([r.temperature for r in p]), np.asarray([r.top_k for r in p], np.int32),
        f32([r.top_p for r in p]), f32([r.min_p for r in p]), f32([r.repetition_penalty for r in p]),
        f32([r.presence_penalty for r in p]), f32([r.frequency_penalty for r in p]),
        np.asarray([s % 2**32 for s in seeds], np.uint32), np.asarray(steps, np.uint32))


def apply_penalties(logits_bv, sp: SamplingArrays, counts_bv, prompt_mask_bv):
  """counts_bv: generated-token counts; prompt_mask_bv: tokens of the prompt (for repetition)."""
  seen = (counts_bv > 0) | prompt_mask_bv
  rp = sp.repetition_penalty[:, None]
  logits_bv = jnp.where(seen, jnp.where(logits_bv > 0, logits_bv / rp, logits_bv * rp), logits_bv)
  logits_bv = logits_bv - sp.presence_penalty[:, None] * (counts_bv > 0)
  return logits_bv - sp.frequency_penalty[:, None] * counts_bv.astype(jnp.float32)


def _top_k_top_p_mask(logits_bv, top_k_b, top_p_b):
  """Keep mask: rank < k, then the nucleus of the k-renormalised probs, as a cut on the logit
  value (as HF's top-k warper: a token tied with the last kept one is kept too).

  One descending sort of the values, no argsort and no scatter back: at batch 32 x 128K vocab
  on the H100 that is 1.0 ms instead of 1.64 (the cub segmented sort itself is ~0.9 ms).
  """
  v = logits_bv.shape[-1]
  sorted_bv = -jnp.sort(-logits_bv, axis=-1)
  k = jnp.where(top_k_b > 0, jnp.minimum(top_k_b, v), v)[:, None]
  rank = jnp.arange(v)[None]
  sorted_bv = jnp.where(rank < k, sorted_bv, NEG)
  probs = jax.nn.softmax(sorted_bv, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs              # mass strictly above this rank
  n_keep = jnp.sum((rank < k) & ((before < top_p_b[:, None]) | (rank == 0)), axis=-1)
  cut = jnp.take_along_axis(sorted_bv, n_keep[:, None] - 1, axis=-1)
  return logits_bv >= cut


def needs_top_k_top_p(rows: Sequence[Optional[SamplingParams]]) -> bool:
  """Whether any row asks for top-k or top-p: the static `top_k_top_p` argument of `sample`."""
  return any(r is not None and (r.top_k > 0 or r.top_p < 1.0) for r in rows)


def filter_logits(logits_bv, sp: SamplingArrays, top_k_top_p: bool = True):
  """Temperature-scaled logits with top-k / top-p / min-p exclusions set to NEG.

  top_k_top_p=False skips the vocabulary sort: only valid when no row asks for either.
  """
  t = jnp.maximum(sp.temperature, 1e-6)[:, None]
  logits_bv = logits_bv / t
  if top_k_top_p:
    asks = ((sp.top_k > 0) | (sp.top_p < 1.0))[:, None]
    keep = _top_k_top_p_mask(logits_bv, sp.top_k, sp.top_p)
    logits_bv = jnp.where(asks & ~keep, NEG, logits_bv)
  # min-p: drop tokens below min_p * p_max, i.e. logit < max + log(min_p).
  thresh = jnp.max(logits_bv, axis=-1, keepdims=True) + jnp.log(jnp.maximum(sp.min_p, 1e-30))[:, None]
  return jnp.where((sp.min_p[:, None] > 0) & (logits_bv < thresh), NEG, logits_bv)


def row_keys(sp: SamplingArrays):
  base = jax.random.key(0)
  return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.fold_in(base, s), n))(sp.seed, sp.step)


def sample(logits_bv, sp: SamplingArrays, counts_bv, prompt_mask_bv, top_k_top_p: bool = True):
  """-> next tokens [B] int32. top_k_top_p (static): False when no row asks for top-k or top-p
  (`needs_top_k_top_p`), which skips the vocabulary sort; the tokens are the same either way.

  No run-time branches: every row is drawn and greedy rows then take the argmax (the draw is a
  few elementwise passes over the logits; a branch would cost a host round trip on GPU).
  """
  logits_bv = apply_penalties(logits_bv.astype(jnp.float32), sp, counts_bv, prompt_mask_bv)
  greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits_bv, sp, top_k_top_p)
  drawn_b = jax.vmap(jax.random.categorical)(row_keys(sp), filtered).astype(jnp.int32)
  return jnp.where(sp.temperature <= 0.0, greedy_b, drawn_b)

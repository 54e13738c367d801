"""Token sampling for a batch of requests, each row with its own parameters, in one jitted function.

Order (as vLLM's v1 sampler): logit_bias and min_tokens on the raw logits -> penalties -> greedy
rows take the argmax -> temperature -> top-k -> top-p (on the top-k-renormalised distribution)
-> min-p -> categorical draw.
A row with temperature 0 is greedy. top_k <= 0, top_p >= 1 and min_p <= 0 switch a filter off.
The optional passes (the top-k/top-p cuts, the biases) are static choices (`SampleOptions`, see
`sample_options`), not `lax.cond`s: on GPU a conditional copies its predicate to the host and
waits for it, which stalled every batch-1 decode step (WORKSPACE_NOTES.md, Inference, ninth
session).
Randomness is per row: key = fold_in(fold_in(key(0), seed), step), so a seeded request gives
the same tokens whatever else is in the batch.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1e30
MAX_LOGPROBS = 20      # top alternatives a request may ask for per token (vLLM's default limit)
MAX_LOGIT_BIAS = 300   # logit_bias entries per request (OpenAI's limit)
BIAS_WIDTH = 512       # per-row bias entries on device: logit_bias, then min_tokens' stop ids


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
  include_stop_str_in_output: bool = False   # vLLM: the text ends after the stop string, not before it
  stop_token_ids: Sequence[int] = ()
  ignore_eos: bool = False
  logprobs: Optional[int] = None         # per generated token: its logprob and this many top ones
  prompt_logprobs: Optional[int] = None  # the same for every prompt token after the first
  logit_bias: Mapping[int, float] = dataclasses.field(default_factory=dict)   # token id -> added logit
  min_tokens: int = 0                    # stop ids and stop strings do not end the reply before this

  def stop_ids(self, eos_ids) -> set:
    """The token ids that end this request: its stop_token_ids, and the model's EOS unless ignored."""
    return set(self.stop_token_ids) | (set() if self.ignore_eos else set(eos_ids))

  def validate(self, vocab_size: Optional[int] = None) -> None:
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
    for name in ("logprobs", "prompt_logprobs"):
      if getattr(self, name) is not None and not 0 <= getattr(self, name) <= MAX_LOGPROBS:
        bad(name, f"use a count in [0, {MAX_LOGPROBS}]")
    if len(self.logit_bias) > MAX_LOGIT_BIAS:
      bad("logit_bias", f"give at most {MAX_LOGIT_BIAS} entries")
    if any(not -100.0 <= v <= 100.0 for v in self.logit_bias.values()):
      bad("logit_bias", "use biases in [-100, 100]")
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in self.logit_bias):
      bad("logit_bias", f"every token id must be in the vocabulary [0, {vocab_size})")
    if not 0 <= self.min_tokens <= self.max_tokens:
      bad("min_tokens", f"use a count in [0, max_tokens={self.max_tokens}]")

  def bias_entries(self, eos_ids) -> list:
    """(token id, bias, until) triples, each applied while fewer than `until` tokens are generated:
    logit_bias for the whole reply, then every stop id held at NEG for the first min_tokens."""
    out = [(int(t), float(v), 2**32 - 1) for t, v in self.logit_bias.items()]
    if self.min_tokens:
      out += [(int(t), NEG, self.min_tokens) for t in sorted(self.stop_ids(eos_ids))]
    if len(out) > BIAS_WIDTH:
      raise ValueError(f"min_tokens={self.min_tokens} holds back {len(out) - len(self.logit_bias)} stop ids and "
                       f"logit_bias has {len(self.logit_bias)} entries: more than {BIAS_WIDTH} in all; "
                       "send fewer stop_token_ids")
    return out


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
  bias_ids: jax.Array     # int32 [B, BIAS_WIDTH]: logits[bias_ids] += bias_vals while step < bias_until
  bias_vals: jax.Array    # float32 [B, BIAS_WIDTH]
  bias_until: jax.Array   # uint32 [B, BIAS_WIDTH]; 0 on unused entries

  @staticmethod
  def from_params(rows: Sequence[Optional[SamplingParams]], steps: Sequence[int],
                  seeds: Sequence[int], eos_ids: Sequence[int] = (), bias=None) -> "SamplingArrays":
    """Host-side packing; `None` rows (free slots) get greedy defaults. eos_ids: the model's, which
    min_tokens holds back with the request's stop_token_ids. bias: the rows' (ids, vals, until)
    arrays already packed (`bias_rows`; the engine keeps them per slot), else packed here."""
    p = [r or SamplingParams(temperature=0.0) for r in rows]
    f32 = lambda xs: np.asarray(xs, np.float32)
    ids, vals, until = bias if bias is not None else bias_rows([r.bias_entries(eos_ids) for r in p])
    return SamplingArrays(
        f32([r.temperature for r in p]), np.asarray([r.top_k for r in p], np.int32),
        f32([r.top_p for r in p]), f32([r.min_p for r in p]), f32([r.repetition_penalty for r in p]),
        f32([r.presence_penalty for r in p]), f32([r.frequency_penalty for r in p]),
        np.asarray([s % 2**32 for s in seeds], np.uint32), np.asarray(steps, np.uint32), ids, vals, until)


def bias_rows(entries: Sequence[list]) -> tuple:
  """Per-row `bias_entries` -> (ids int32, vals float32, until uint32), each [rows, BIAS_WIDTH]."""
  ids = np.zeros((len(entries), BIAS_WIDTH), np.int32)
  vals = np.zeros((len(entries), BIAS_WIDTH), np.float32)
  until = np.zeros((len(entries), BIAS_WIDTH), np.uint32)
  for i, e in enumerate(entries):
    if e:
      t, v, u = zip(*e)
      ids[i, :len(e)], vals[i, :len(e)], until[i, :len(e)] = t, v, u
  return ids, vals, until


class SampleOptions(NamedTuple):
  """The optional passes a sampling program runs (static: one program per combination in use)."""
  top_k_top_p: bool = True   # the top-k/top-p cuts; tokens are the same without them when no row asks
  bias: bool = False         # logit_bias / min_tokens entries


def sample_options(rows: Sequence[Optional[SamplingParams]]) -> SampleOptions:
  """The passes these rows need."""
  rows = [r for r in rows if r is not None]
  return SampleOptions(top_k_top_p=any(r.top_k > 0 or r.top_p < 1.0 for r in rows),
                       bias=any(r.logit_bias or r.min_tokens for r in rows))


def apply_bias(logits_bv, sp: SamplingArrays):
  """logit_bias and min_tokens: each row's live entries added at their ids (unused entries add 0)."""
  live = sp.step[:, None] < sp.bias_until
  rows = jnp.arange(logits_bv.shape[0])[:, None]
  return logits_bv.at[rows, sp.bias_ids].add(jnp.where(live, sp.bias_vals, 0.0))


def apply_penalties(logits_bv, sp: SamplingArrays, counts_bv, prompt_mask_bv):
  """counts_bv: generated-token counts; prompt_mask_bv: tokens of the prompt (for repetition)."""
  seen = (counts_bv > 0) | prompt_mask_bv
  rp = sp.repetition_penalty[:, None]
  logits_bv = jnp.where(seen, jnp.where(logits_bv > 0, logits_bv / rp, logits_bv * rp), logits_bv)
  logits_bv = logits_bv - sp.presence_penalty[:, None] * (counts_bv > 0)
  return logits_bv - sp.frequency_penalty[:, None] * counts_bv.astype(jnp.float32)


def _ordered_keys(x_bv):
  """float32 -> uint32 keys in the same order (finite values): negative floats flip every bit,
  the others set the sign bit. -0.0 becomes +0.0 first (equal values, equal keys)."""
  bits = jax.lax.bitcast_convert_type(jnp.where(x_bv == 0, 0.0, x_bv), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest_key_reaching(keys_bv, weight_bv, target_b, bits: int):
  """Per row, the largest uint32 t with sum(weight[keys >= t]) >= target (monotone in t): a
  radix descent from the top bit, `bits` bits a pass, each pass weighing the 2^bits - 1 next
  prefixes (one reduction over the row per prefix). target must not exceed the row's total."""
  prefix = jnp.zeros(keys_bv.shape[:1], jnp.uint32)
  steps = jnp.arange(1, 1 << bits, dtype=jnp.uint32)
  for shift in range(32 - bits, -1, -bits):
    cand_bj = prefix[:, None] | (steps << shift)[None]
    mass_bj = jnp.sum(jnp.where(keys_bv[:, None, :] >= cand_bj[:, :, None], weight_bv[:, None, :], 0),
                      axis=-1)
    passed = jnp.sum(mass_bj >= target_b[:, None], axis=-1).astype(jnp.uint32)
    prefix = prefix | (passed << shift)
  return prefix


def _top_k_top_p_mask(logits_bv, top_k_b, top_p_b):
  """Keep mask: the top-k values, then the nucleus of their renormalised probabilities, as a
  cut on the value (as HF's warpers: a token tied with the last kept one is kept too).

  No sort: each cut is found by a radix descent over the values' ordered bits. The top-k cut c
  is the largest value with at least k values >= it (the k-th value); the top-p cut the
  largest value u whose mass(values >= u) reaches top_p x Z, over the top-k multiset (values
  above c, and c counted k - #above times): the last value a sorted cumulative sum keeps.
  H100, A13B vocabulary and sampling defaults (top_k 20, top_p 0.8): the batch-32 decode step
  0.6 ms faster than with the descending sort (cub's segmented sort); batch 1 the same
  (WORKSPACE_NOTES.md, Inference, nineteenth session).
  """
  b, v = logits_bv.shape
  bits = 4 if b <= 8 else 2   # few rows: launch-bound, fewer passes; many: read-bound, fewer reads
  keys = _ordered_keys(logits_bv)
  k = jnp.where(top_k_b > 0, jnp.minimum(top_k_b, v), v)
  c_key = _largest_key_reaching(keys, jnp.ones_like(keys, jnp.int32), k, bits)
  above, tied = keys > c_key[:, None], keys == c_key[:, None]
  share = (k - jnp.sum(above, axis=-1)) / jnp.maximum(jnp.sum(tied, axis=-1), 1)
  e = jnp.exp(logits_bv - jnp.max(logits_bv, axis=-1, keepdims=True))
  w = jnp.where(above, e, jnp.where(tied, e * share[:, None].astype(jnp.float32), 0.0))
  u_key = _largest_key_reaching(keys, w, top_p_b * jnp.sum(w, axis=-1), bits)
  cut = jnp.where(top_p_b < 1.0, jnp.maximum(u_key, c_key), c_key)
  return keys >= cut[:, None]


def filter_logits(logits_bv, sp: SamplingArrays, top_k_top_p: bool = True):
  """Temperature-scaled logits with top-k / top-p / min-p exclusions set to NEG.

  top_k_top_p=False skips the top-k/top-p cuts: only valid when no row asks for either.
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


def sample(logits_bv, sp: SamplingArrays, counts_bv, prompt_mask_bv, options: SampleOptions = SampleOptions(),
           allowed_bv=None):
  """-> next tokens [B] int32. options (static, `sample_options` of the rows): the optional passes.
  allowed_bv: None, or bool [B, V] of the tokens each row may take (structured outputs).

  No run-time branches: every row is drawn and greedy rows then take the argmax (the draw is a
  few elementwise passes over the logits; a branch would cost a host round trip on GPU).
  """
  logits_bv = jnp.asarray(logits_bv, jnp.float32)
  if options.bias:
    logits_bv = apply_bias(logits_bv, sp)
  logits_bv = apply_penalties(logits_bv, sp, counts_bv, prompt_mask_bv)
  if allowed_bv is not None:
    logits_bv = jnp.where(allowed_bv, logits_bv, NEG)
  greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits_bv, sp, options.top_k_top_p)
  drawn_b = jax.vmap(jax.random.categorical)(row_keys(sp), filtered).astype(jnp.int32)
  return jnp.where(sp.temperature <= 0.0, greedy_b, drawn_b)


def logprob_width(rows: Sequence[Optional[SamplingParams]], field: str = "logprobs") -> Optional[int]:
  """The static `width` of `token_logprobs` for these rows: None when no row asks for logprobs,
  0 when none asks for alternatives, else MAX_LOGPROBS (one program, whatever each row's count)."""
  asks = [getattr(r, field) for r in rows if r is not None and getattr(r, field) is not None]
  if not asks:
    return None
  return MAX_LOGPROBS if max(asks) > 0 else 0


def token_logprobs(logits_nv, tok_n, width: int):
  """Log-probabilities of the model's own distribution (the raw logits, before penalties,
  temperature and filters: vLLM's default `raw_logprobs`) -> (logprob of tok [N], the `width`
  most likely ids [N, width], their logprobs [N, width]). Ties: lower id first."""
  lp_nv = jax.nn.log_softmax(logits_nv.astype(jnp.float32), axis=-1)
  chosen_n = jnp.take_along_axis(lp_nv, tok_n[:, None], axis=-1)[:, 0]
  if width == 0:
    n = lp_nv.shape[0]
    return chosen_n, jnp.zeros((n, 0), jnp.int32), jnp.zeros((n, 0), jnp.float32)
  top_lp, top_ids = jax.lax.top_k(lp_nv, width)
  return chosen_n, top_ids.astype(jnp.int32), top_lp

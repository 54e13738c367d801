"""Serving engine: request slots over one preallocated KV cache, chunked prefill, continuous batching.

    submit(prompt ids) -> waiting -> a free slot -> prefill in chunks (the slots' chunks of one
      length bucket in one call) -> first token sampled in the last chunk
      -> decode steps over ALL slots at once -> stop -> free

Prefix caching (prefix_cache.py): a new request starts from the rows of the slot that shares the
longest prefix with its prompt (copied, when that slot is busy); prefill starts after them.

Both prefill and decode call the core `forward` with a cache (rows are independent: a query at
position p sees cache rows j <= p of its own slot, so a reused slot never sees stale entries).
Shapes are bucketed so requests join and leave without recompiling: the decode batch is always
`max_slots` (free rows write at a dropped position); prefill chunks and the cache rows a prefill
call attends over are powers of two, its rows a power of four (chunk x rows <= `prefill_chunk`).
Where the decode-attention kernel runs (Hopper), a decode step passes the whole cache and the
kernel reads each slot's rows below its length in place: one program for every length. Elsewhere attention runs over the cache prefix rounded up to `kv_block` rows (one program
per bucket), so the bytes a step reads track the longest live sequence, not `max_len`.

Decode state (last token, position, sampling parameters, penalty counts) lives on the device and
the step donates it with the cache; the host reads step n's tokens after dispatching step n+1, so
stop checks and detokenisation overlap the next step (a finished slot wastes one row of one step).
A request with a `Guide` (structured outputs) needs its last token before its next mask: while one
is live a step runs as two programs, the model's forward (dispatched first, so it runs while the
host reads the last tokens and computes the masks) and the sampling, masked.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import queue
import threading
import time
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hunyuan_jax.config import ModelConfig
from hunyuan_jax.model import cache_logical_axes, forward, init_cache, moe_parallel, write_kv_rows
from hunyuan_jax.model.attention import cache_read_in_place, fuse_qkv, qkv_shards
from hunyuan_jax.model.transformer import Transformer
from hunyuan_jax.serve import structured
from hunyuan_jax.serve.metrics import EngineMetrics
from hunyuan_jax.serve.prefix_cache import MIN_COPY, SlotPrefixes
from hunyuan_jax.serve.sampling import (NEG, SamplingArrays, SamplingParams, bias_rows, logprob_width, sample,
                                        sample_options, token_logprobs)

DROP = 2**30  # a cache position past any buffer: the model's scatter drops the write


class TokenLogprob(NamedTuple):
  """A token's log-probability under the model, and the most likely tokens at its position."""
  token_id: int
  logprob: float
  top: tuple        # ((id, logprob), ...), most likely first; as many as the request asked for


@dataclasses.dataclass
class Delta:
  """One engine event for a request: new token ids, the text they complete, and maybe the end."""
  token_ids: list
  text: str
  finish_reason: Optional[str] = None   # "stop" | "length" | "abort"
  logprobs: list = dataclasses.field(default_factory=list)   # TokenLogprob per token id, if asked


@dataclasses.dataclass(eq=False)
class Request:
  prompt_ids: list
  params: SamplingParams
  id: str = ""
  output_ids: list = dataclasses.field(default_factory=list)
  text: str = ""
  logprobs: list = dataclasses.field(default_factory=list)          # TokenLogprob per output id
  prompt_logprobs: list = dataclasses.field(default_factory=list)   # per prompt id; [0] is None
  guide: Any = None           # structured.Guide: the tokens this request may take next
  finish_reason: Optional[str] = None
  events: "queue.Queue[Delta]" = dataclasses.field(default_factory=queue.Queue)
  cancelled: bool = False
  # engine bookkeeping
  slot: int = -1
  cached: int = 0             # prompt tokens whose K/V came from the prefix cache (not computed)
  prefilled: int = 0
  scheduled: int = 0          # tokens whose computation has been dispatched
  seed: int = 0
  _decoder: Any = None
  _bias: list = dataclasses.field(default_factory=list)   # SamplingParams.bias_entries, packed at submit
  _prompt_bits: Any = None    # the prompt's tokens as a packed [V / 8] mask (repetition penalty)
  _emitted: int = 0           # chars of `text` already sent as deltas
  _arrived: float = 0.0       # time.monotonic() at submit, and at the last token (metrics)
  _last_token_at: float = 0.0

  @property
  def done(self) -> bool:
    return self.finish_reason is not None

  def rows_written(self) -> list:
    """The tokens whose K/V rows are in (or dispatched to) this request's slot, from position 0:
    the prompt so far, then each output token but the last (an output is written when it is
    fed back, which happens in the step after it was sampled)."""
    if self.prefilled < len(self.prompt_ids):
      return self.prompt_ids[:self.prefilled]
    return self.prompt_ids + self.output_ids[:-1]


class SlotState(NamedTuple):
  """Device-resident decode state, one row per slot."""
  tokens_b: jax.Array        # int32 last token (the next decode input)
  positions_b: jax.Array     # int32 cache row the next token is written at
  active_b: jax.Array        # bool
  sp: SamplingArrays
  counts_bv: jax.Array       # int32 generated-token counts (presence/frequency/repetition)
  prompt_bv: jax.Array       # bool tokens of the prompt (repetition penalty)


def cache_bytes(cache) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(cache))


def generation_defaults(model_dir: Optional[str]) -> dict:
  """Sampling defaults from a model folder's generation_config.json (as vLLM applies them)."""
  path = os.path.join(model_dir or "", "generation_config.json")
  if not model_dir or not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    gen = json.load(f)
  keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
  out = {k: gen[k] for k in keys if gen.get(k) is not None}
  if gen.get("do_sample") is False:
    out["temperature"] = 0.0
  return out


def _rows_to_cache(cache, kv_rows, pos_bt, b_idx=None):
  """Scatter the new K/V rows a forward returned into the full cache (in place: it is donated)."""
  return {key: write_kv_rows(cache[key], kv_rows[key], pos_bt, b_idx) for key in cache}


class Engine:
  def __init__(self, cfg: ModelConfig, params, *, max_slots: int = 8, max_len: Optional[int] = None,
               prefill_chunk: int = 512, kv_block: int = 256, tokenizer=None, eos_ids: Sequence[int] = (),
               mesh=None, cache_dtype=None, prefix_caching: bool = True, fused_qkv: bool = True):
    # fused_qkv: one q/k/v GEMM per layer (attention.fuse_qkv); the fused copy of those weights
    # exists next to the caller's until the caller drops them.
    self.cfg, self.tokenizer, self.mesh = cfg, tokenizer, mesh
    shards = qkv_shards(cfg, mesh)
    self.params = fuse_qkv(params, shards) if fused_qkv and shards else params
    self.max_slots = max_slots
    self.prefix_caching = prefix_caching
    self.max_len = int(max_len or cfg.max_position_embeddings)
    self.prefill_chunk = max(16, 1 << (int(prefill_chunk) - 1).bit_length())
    self.kv_block = kv_block
    self.cache_in_place = cache_read_in_place(cfg, max_slots, self.max_len, cache_dtype)
    self.eos_ids = set(eos_ids) or set(getattr(tokenizer, "eos_ids", None) or cfg.eos_token_ids)
    # A vocabulary padded past the tokenizer's (Hunyuan-Large: 129024 rows, 128166 tokens) must
    # never yield an id the tokenizer cannot spell: those logits are masked.
    n_tok = getattr(tokenizer, "vocab_size", cfg.vocab_size)
    self._spelled = n_tok if n_tok < cfg.vocab_size else None
    b, v = max_slots, cfg.vocab_size
    make_cache = functools.partial(init_cache, cfg, b, self.max_len, cache_dtype)
    self._cache_shardings = None
    if mesh is not None:  # built in place, shard by shard: the whole cache may not fit one device
      from hunyuan_jax.sharding import shardings_for
      self._cache_shardings = shardings_for(cache_logical_axes(cfg), jax.eval_shape(make_cache), mesh)
    self.cache = jax.jit(make_cache, out_shardings=self._cache_shardings)()
    self.cache_bytes = cache_bytes(self.cache)
    self._sp_host = [None] * b
    self._bias_host = bias_rows([[]] * b)   # each slot's logit_bias / min_tokens entries, packed once
    self.state = SlotState(jnp.zeros(b, jnp.int32), jnp.full(b, DROP, jnp.int32), jnp.zeros(b, bool),
                           SamplingArrays.from_params([None] * b, [0] * b, [0] * b),
                           jnp.zeros((b, v), jnp.int32), jnp.zeros((b, v), bool))
    self._state_sharding = None
    if mesh is not None:
      self._state_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      self.state = jax.device_put(self.state, self._state_sharding)
    self.slots: list[Optional[Request]] = [None] * b
    self._prefixes = SlotPrefixes(b)
    self.metrics = EngineMetrics()
    self._pos_host = np.zeros(b, np.int64)
    self._inbox: "queue.Queue[Request]" = queue.Queue()   # submit (any thread) -> the engine thread
    self._waiting: list = []    # submitted, not yet in a slot (first come, first placed)
    self._pending: list = []    # (device tokens, device logprobs or None, [(index, slot, request)]) not yet read
    self._ids = itertools.count()
    self._lock = threading.Lock()
    self._wake = threading.Event()
    # options: the optional sampling passes (static, see sampling.sample_options); logprobs: None,
    # or how many alternatives to return (sampling.logprob_width). A few programs per kv_len, each
    # compiled the first time a mix of requests needs it.
    static = ("kv_len", "options", "logprobs")
    self._decode = jax.jit(self._on_mesh(self._decode_fn), static_argnames=static, donate_argnums=(1, 2))
    self._forward = jax.jit(self._on_mesh(self._forward_fn), static_argnames=("kv_len",), donate_argnums=(1,))
    self._sample = jax.jit(self._on_mesh(self._sample_fn), static_argnames=static[1:], donate_argnums=(0,))
    self._prefill = jax.jit(self._on_mesh(self._prefill_fn), static_argnames=static + ("prompt_logprobs",),
                            donate_argnums=(1, 2))
    self._set_rows = jax.jit(self._set_rows_fn, donate_argnums=(0,))
    self._copy_rows = jax.jit(self._copy_rows_fn, static_argnames=("n",), donate_argnums=(0,))

  # ---------------------------------------------------------------- public API (thread-safe)
  def submit(self, prompt_ids: Sequence[int], params: Optional[SamplingParams] = None,
             request_id: Optional[str] = None, guide=None) -> Request:
    """Queues a request; `guide` (a structured.Guide over this engine's vocabulary) constrains it."""
    params = params or SamplingParams()
    params.validate(self.cfg.vocab_size)
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
      raise ValueError("the prompt is empty; send at least one token")
    if len(prompt_ids) >= self.max_len:
      raise ValueError(f"the prompt has {len(prompt_ids)} tokens but the context holds {self.max_len} "
                       "(prompt plus at least one generated token); shorten the prompt")
    bad = [t for t in prompt_ids if not 0 <= t < self.cfg.vocab_size]
    if bad:
      raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
    req = Request(prompt_ids, params, id=request_id or f"req-{next(self._ids)}", guide=guide,
                  _arrived=time.monotonic())
    req._bias = params.bias_entries(self.eos_ids)   # raises if min_tokens' stop ids do not fit
    in_prompt = np.zeros(self.cfg.vocab_size, bool)
    in_prompt[prompt_ids] = True
    req._prompt_bits = np.packbits(in_prompt)
    req.seed = params.seed if params.seed is not None else int(np.random.randint(0, 2**31))
    if self.tokenizer is not None:
      from hunyuan_jax.tokenizer import StreamDecoder
      req._decoder = StreamDecoder(self.tokenizer)
    self._inbox.put(req)
    self._wake.set()
    return req

  def guide(self, grammar, think_budget: Optional[int] = None) -> "structured.Guide":
    """A fresh position in `grammar` over this engine's vocabulary (for `submit(guide=...)`)."""
    if self.tokenizer is None:
      raise ValueError("structured outputs need the engine's tokenizer")
    table = structured.token_table(self.tokenizer, self.cfg.vocab_size, sorted(self.eos_ids))
    return structured.Guide(grammar, table, think_budget)

  def cancel(self, req: Request) -> None:
    """Frees the request's slot at the next step (client gone)."""
    req.cancelled = True
    self._wake.set()

  def num_active(self) -> int:
    return sum(r is not None for r in self.slots)

  def metrics_text(self, model_name: str) -> str:
    """The Prometheus exposition of `self.metrics` and the engine's state now (any thread)."""
    running = [r for r in self.slots if r is not None]
    rows = sum(r.prefilled + len(r.output_ids) for r in running)
    return self.metrics.render(model_name, len(running), len(self._waiting) + self._inbox.qsize(),
                               rows / (self.max_slots * self.max_len))

  def has_work(self) -> bool:
    return (self.num_active() > 0 or not self._inbox.empty() or bool(self._waiting)
            or bool(self._pending))

  def generate(self, prompts: Sequence[Sequence[int]], params=None):
    """Runs until every prompt is done; returns the Requests (output_ids, text, finish_reason).
    params: one SamplingParams for all prompts, or one per prompt."""
    each = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
    reqs = [self.submit(p, dataclasses.replace(sp) if sp else None) for p, sp in zip(prompts, each)]
    while not all(r.done for r in reqs):
      self.step()
    return reqs

  def run_forever(self, stop: threading.Event) -> None:
    """The server's engine thread."""
    while not stop.is_set():
      if self.has_work():
        try:
          self.step()
        except Exception:  # a bug must not hang every client: end the live requests, keep serving
          import traceback
          traceback.print_exc()
          self._abort_all()
      else:
        self._wake.wait(0.05)
        self._wake.clear()

  def _abort_all(self):
    self._pending = []
    for i, r in enumerate(self.slots):
      if r is not None:
        if not r.done:
          self._finish(r, "abort")
        self.slots[i] = None
    self._sp_host = [None] * self.max_slots
    self._bias_host = bias_rows([[]] * self.max_slots)
    self._prefixes.forget()   # a failed program may have lost the cache

  def precompile(self, params: Sequence[SamplingParams] = (SamplingParams(),)) -> int:
    """Compiles every program requests sampled like `params` can meet, before any arrives: each
    prefill shape (chunk, rows, cache rows), each decode cache bucket and each prefix copy. They
    run on padding rows, whose writes drop, so nothing changes. Returns how many ran. Without
    it a program compiles the first time a mix of requests meets it, stalling every live one."""
    if self.num_active() or self._pending:
      raise RuntimeError("precompile runs before the engine serves requests")
    self._upload_rows()   # the state as serving passes it (the first one's arrays differ in type)
    nbytes, runs = -(-self.cfg.vocab_size // 8), 0
    lengths = range(1, self.max_len + 1)
    prefill_lens = sorted({self._prefill_kv_len(n) for n in lengths})
    decode_lens = sorted({self._decode_kv_len(n) for n in lengths})
    for sp in params:
      static = dict(options=sample_options([sp]), logprobs=logprob_width([sp]))
      c = 16
      while c <= self.prefill_chunk:
        for p in self._prefill_row_counts(c):
          pad = lambda dt, v=0: np.full((p, c), v, dt)
          for kv_len in [k for k in prefill_lens if k >= min(c, self.max_len)]:   # a c-chunk ends past c / 2
            _, _, _, self.cache, self.state = self._prefill(
                self.params, self.cache, self.state, None, np.zeros((p, nbytes), np.uint8),
                np.full(p, self.max_slots, np.int32), pad(np.int32), pad(np.int32, DROP), pad(np.int32),
                np.zeros(p, np.int32), np.zeros(p, bool), kv_len=kv_len, prompt_logprobs=None, **static)
            runs += 1
        c *= 2
      for kv_len in decode_lens:
        _, _, self.cache, self.state = self._decode(self.params, self.cache, self.state, kv_len=kv_len, **static)
        runs += 1
    n = MIN_COPY
    while n < 2 * self.max_len:
      self.cache = self._copy_rows(self.cache, np.int32(0), np.int32(0), n=self._copy_len(n))
      n, runs = n * 2, runs + 1
    jax.block_until_ready(self.cache)
    return runs

  # ---------------------------------------------------------------- scheduling
  def step(self) -> None:
    """One iteration: admit, prefill a chunk per new slot, dispatch a decode step, read the last one."""
    with self._lock:
      self._drop_cancelled()
      self._admit()
      self._prefill_waiting_slots()
      decoding = [(i, r) for i, r in enumerate(self.slots)
                  if r is not None and r.prefilled == len(r.prompt_ids) and not r.done
                  and r.scheduled < self._token_limit(r)]
      previous = self._pending
      self._pending = []
      if any(r.guide is not None for _, r in decoding):
        logits, self.cache = self._forward(self.params, self.cache, self.state, kv_len=self._step_kv_len(decoding))
        self._consume_all(previous)           # while the forward runs: the guides see the last tokens
        self._dispatch_decode(decoding, logits)
        return
      if decoding:
        self._dispatch_decode(decoding)
      self._consume_all(previous)

  def _consume_all(self, steps):
    for toks, lps, rows in steps:
      self._consume(np.asarray(toks), jax.tree.map(np.asarray, lps), rows)

  def _token_limit(self, r: Request) -> int:
    return min(r.params.max_tokens, self.max_len - len(r.prompt_ids))

  def _drop_cancelled(self):
    for i, r in enumerate(self.slots):
      if r is not None and r.cancelled and not r.done:
        self._finish(r, "abort")
    for i, r in enumerate(self.slots):
      if r is not None and r.done:
        self._free(i)

  def _admit(self):
    while not self._inbox.empty():
      self._waiting.append(self._inbox.get())
    waiting, self._waiting, changed = self._waiting, [], False
    for r in waiting:
      if r.cancelled:
        self._finish(r, "abort")
        continue
      reuse = self.prefix_caching and r.params.prompt_logprobs is None   # those need every row's logits
      placed = self._prefixes.place(r.prompt_ids, self.slots, reuse) if None in self.slots else None
      if placed is None or reuse and self._prefixes.prefill_to_share(r.prompt_ids, self.slots, placed[2]):
        self._waiting.append(r)
        continue
      i, source, n = placed
      if source != i:
        self.cache = self._copy_rows(self.cache, np.int32(source), np.int32(i), n=self._copy_len(n))
      r.slot, self.slots[i], self._sp_host[i] = i, r, r.params
      r.cached = r.prefilled = n
      self.metrics.admitted(len(r.prompt_ids), n)
      self._set_bias_row(i, r._bias)
      self._pos_host[i] = 0
      changed = True
    if changed:
      self._upload_rows()

  def _copy_len(self, n: int) -> int:
    """Rows a prefix copy moves: n rounded up to a power of two (one program per size)."""
    return min(self.max_len, max(MIN_COPY, 1 << (n - 1).bit_length()))

  def _copy_rows_fn(self, cache, source, dest, *, n):
    """The first n cache rows of slot `source` -> slot `dest` (rows past the shared prefix are
    rewritten by the prefill, or lie past the slot's length)."""
    def copy(x):   # [R, B, n_kv, S, D]
      rows = jax.lax.dynamic_slice_in_dim(x, source, 1, axis=1)[:, :, :, :n]
      return jax.lax.dynamic_update_slice_in_dim(x, rows, dest, axis=1)
    return self._constrain(jax.tree.map(copy, cache))

  def _free(self, i: int):
    self._prefixes.freed(i, self.slots[i].rows_written())
    self.slots[i] = None
    self._sp_host[i] = None
    self._set_bias_row(i, [])
    self._upload_rows()

  def _set_bias_row(self, i: int, entries: list):
    for host, row in zip(self._bias_host, bias_rows([entries])):
      host[i] = row[0]

  def _upload_rows(self):
    """Host mirror -> device rows: active mask, positions, sampling parameters."""
    b = self.max_slots
    active = np.array([r is not None and r.prefilled == len(r.prompt_ids) and not r.done
                       and r.scheduled < self._token_limit(r) for r in self.slots])
    pos = np.where(active, self._pos_host, DROP).astype(np.int32)
    steps = [r.scheduled if r else 0 for r in self.slots]
    seeds = [r.seed if r else 0 for r in self.slots]
    sp = SamplingArrays.from_params(self._sp_host, steps, seeds, bias=self._bias_host)
    assert len(active) == b
    self.state = self._set_rows(self.state, active, pos, sp)

  def _set_rows_fn(self, state: SlotState, active, pos, sp):
    return self._pin_state(state._replace(active_b=active, positions_b=pos, sp=sp))

  def _kv_len(self, n: int) -> int:
    return int(min(self.max_len, -(-n // self.kv_block) * self.kv_block))

  def _decode_kv_len(self, n: int) -> int:
    """The cache rows a decode step with `n` rows in use passes on (a static argument)."""
    return self.max_len if self.cache_in_place else self._kv_len(n)

  # ---------------------------------------------------------------- prefill
  def _prefill_waiting_slots(self):
    """The next chunk of every slot still prefilling. Chunks of one length bucket run in one call,
    up to the power of four of rows that keeps rows x bucket <= prefill_chunk: a short chunk (a next turn on the prefix
    cache, the last prompt token of n choices) reads as many weights as a long one, so rows batched
    share that read. A request asking for prompt logprobs runs alone (its logits are [bucket, V])."""
    groups: dict = {}
    for i, r in enumerate(self.slots):
      if r is None or r.prefilled == len(r.prompt_ids):
        continue
      n = min(self.prefill_chunk, len(r.prompt_ids) - r.prefilled)
      c = max(16, 1 << (n - 1).bit_length())
      alone = i if r.params.prompt_logprobs is not None else -1
      groups.setdefault((c, alone), []).append((i, r, n))
    for (c, alone), rows in groups.items():
      per_call = 1 if alone >= 0 else self._rows_per_call(c)
      for k in range(0, len(rows), per_call):
        self._prefill_rows(rows[k:k + per_call], c)

  def _rows_per_call(self, c: int) -> int:
    """Rows one prefill call of c-token chunks may take: a power of four, rows x c <= prefill_chunk."""
    per_call = 1
    while per_call * 4 * c <= self.prefill_chunk:
      per_call *= 4
    return per_call

  def _prefill_row_counts(self, c: int) -> list:
    """The row counts a prefill call of c-token chunks can have: powers of four up to the slots
    (rounded up) or the call's limit, whichever is less."""
    counts = [1]
    while counts[-1] < min(self.max_slots, self._rows_per_call(c)):
      counts.append(counts[-1] * 4)
    return counts

  def _prefill_kv_len(self, n: int) -> int:
    """Cache rows a prefill call attends over: a power of two (few programs; the kernel reads
    only each row's own length where it runs)."""
    return int(min(self.max_len, max(self.kv_block, 1 << (n - 1).bit_length())))

  def _prefill_rows(self, rows, c: int):
    """One prefill call: the next n tokens of each (slot, request, n) in `rows`, padded to c
    tokens and to a power-of-four row count (padding rows name slot max_slots: their writes drop).
    Each row count is a program per (c, kv_len), compiled when first met: powers of four halve
    them against powers of two, for at most 4x the rows of a call that is weight-bound anyway."""
    p, nbytes = 1, -(-self.cfg.vocab_size // 8)
    while p < len(rows):
      p *= 4
    slots = np.full(p, self.max_slots, np.int32)
    toks, nxt = np.zeros((p, c), np.int32), np.zeros((p, c), np.int32)   # nxt: the token each position predicts
    pos = np.full((p, c), DROP, np.int32)
    last_idx, is_last = np.zeros(p, np.int32), np.zeros(p, bool)
    prompt_bits, allowed = np.zeros((p, nbytes), np.uint8), None
    for j, (i, r, n) in enumerate(rows):
      start = r.prefilled
      slots[j], last_idx[j], is_last[j] = i, n - 1, start + n == len(r.prompt_ids)
      toks[j, :n] = r.prompt_ids[start:start + n]
      pos[j, :n] = np.arange(start, start + n)
      nxt[j, :n] = r.prompt_ids[start + 1:start + n + 1] + [0] * bool(is_last[j])
      prompt_bits[j] = r._prompt_bits
      if is_last[j] and r.guide is not None:
        if allowed is None:
          allowed = np.full((p, nbytes), 255, np.uint8)
        allowed[j] = r.guide.allowed_bits()
    params = [r.params for _, r, _ in rows]
    first, lp, prompt_lp, self.cache, self.state = self._prefill(
        self.params, self.cache, self.state, allowed, prompt_bits, slots, toks, pos, nxt, last_idx, is_last,
        kv_len=max(self._prefill_kv_len(r.prefilled + n) for _, r, n in rows),
        options=sample_options(params), logprobs=logprob_width(params),
        prompt_logprobs=logprob_width(params, "prompt_logprobs"))
    finished = []
    for j, (i, r, n) in enumerate(rows):
      if prompt_lp is not None:   # a host read: only requests that ask for prompt logprobs wait on it
        if r.prefilled == 0:
          r.prompt_logprobs = [None]
        keep = n - bool(is_last[j])   # the last prompt position predicts the first output token
        r.prompt_logprobs += _logprob_entries(jax.tree.map(np.asarray, prompt_lp), range(j * c, j * c + keep),
                                              nxt.reshape(-1), r.params.prompt_logprobs)
      r.prefilled += n
      if is_last[j]:
        r.scheduled = 1
        self._pos_host[i] = len(r.prompt_ids)
        finished.append((j, i, r))
    if finished:
      self._upload_rows()
      self._pending.append((first, lp, finished))

  def _prefill_fn(self, params, cache, state: SlotState, allowed_bits, prompt_bits, slots_p, toks_pc, pos_pc,
                  next_pc, last_p, is_last_p, *, kv_len, options, logprobs, prompt_logprobs):
    p, c = toks_pc.shape
    v = self.cfg.vocab_size
    rows = jax.tree.map(lambda x: jnp.take(x, slots_p, axis=1, mode="clip")[:, :, :, :kv_len], cache)
    model = Transformer(self.cfg)
    h = model.apply({"params": params}, toks_pc, pos_pc, rows, None, True)
    last_h = h.hidden[jnp.arange(p), last_p][:, None]
    logits_pv = self._spellable(model.apply({"params": params}, last_h, method=Transformer.logits)[:, 0])
    prompt_lp = None
    if prompt_logprobs is not None:
      logits = model.apply({"params": params}, h.hidden, method=Transformer.logits).reshape(p * c, v)
      prompt_lp = token_logprobs(self._spellable(logits), next_pc.reshape(-1), prompt_logprobs)
    cache = self._constrain(_rows_to_cache(cache, h.kv_rows, pos_pc, slots_p))
    prompt_pv = self._unpack(prompt_bits, p)   # each whole prompt's, cached prefix included
    sp_rows = jax.tree.map(lambda a: jnp.take(a, slots_p, axis=0, mode="clip"), state.sp)
    tok_p = sample(logits_pv, sp_rows, jnp.zeros((p, v), jnp.int32), prompt_pv, options,
                   self._unpack(allowed_bits, p))
    lp = None if logprobs is None else token_logprobs(logits_pv, tok_p, logprobs)
    sampled = jnp.where(is_last_p, slots_p, self.max_slots)   # rows whose first token this is; others drop
    counts_pv = jax.nn.one_hot(tok_p, v, dtype=jnp.int32) * is_last_p[:, None]
    state = state._replace(tokens_b=state.tokens_b.at[sampled].set(tok_p, mode="drop"),
                           counts_bv=state.counts_bv.at[slots_p].set(counts_pv, mode="drop"),
                           prompt_bv=state.prompt_bv.at[slots_p].set(prompt_pv, mode="drop"))
    return tok_p, lp, prompt_lp, cache, self._pin_state(state)

  # ---------------------------------------------------------------- decode
  def _step_kv_len(self, decoding) -> int:
    return self._decode_kv_len(int(max(self._pos_host[i] for i, _ in decoding)) + 1)

  def _dispatch_decode(self, decoding, logits=None):
    """One decode step (or, given the forward's `logits`, its sampling) for the `decoding` rows."""
    static = dict(options=sample_options(self._sp_host), logprobs=logprob_width(self._sp_host))
    if logits is None:
      toks, lps, self.cache, self.state = self._decode(self.params, self.cache, self.state,
                                                       kv_len=self._step_kv_len(decoding), **static)
    else:
      toks, lps, self.state = self._sample(self.state, logits, self._allowed_rows(), **static)
    for i, r in decoding:
      self._pos_host[i] += 1
      r.scheduled += 1
    # A slot that reached its token limit must not run again: deactivate it before the next step.
    if any(r.scheduled >= self._token_limit(r) for _, r in decoding):
      self._upload_rows()
    self._pending.append((toks, lps, [(i, i, r) for i, r in decoding]))

  def _allowed_rows(self):
    """Packed token masks [B, V / 8] of the guided rows (every token for the others), or None."""
    guided = [(i, r.guide) for i, r in enumerate(self.slots) if r is not None and r.guide is not None]
    if not guided:
      return None
    bits = np.full((self.max_slots, -(-self.cfg.vocab_size // 8)), 255, np.uint8)
    for i, g in guided:
      bits[i] = g.allowed_bits()
    return bits

  def _spellable(self, logits_nv):
    if self._spelled is None:
      return logits_nv
    ids = jnp.arange(logits_nv.shape[-1])
    return jnp.where(ids < self._spelled, logits_nv, NEG)

  def _unpack(self, bits, rows: int):
    if bits is None:
      return None
    return jnp.unpackbits(bits.reshape(rows, -1), axis=-1, count=self.cfg.vocab_size).astype(bool)

  def _decode_fn(self, params, cache, state: SlotState, *, kv_len, options, logprobs):
    logits_bv, cache = self._forward_fn(params, cache, state, kv_len=kv_len)
    tok_b, lps, state = self._sample_fn(state, logits_bv, None, options=options, logprobs=logprobs)
    return tok_b, lps, cache, state

  def _forward_fn(self, params, cache, state: SlotState, *, kv_len):
    """The model over each slot's last token: logits [B, V], and the cache with their K/V rows."""
    pos_b = jnp.where(state.active_b, state.positions_b, DROP)
    # Attend over the used prefix only (kv_len bucket) unless the kernel reads the cache in place;
    # the cache axes are [R, B, n_kv, S, D].
    small = cache if kv_len == self.max_len else jax.tree.map(lambda x: x[:, :, :, :kv_len], cache)
    out = forward(params, state.tokens_b[:, None], pos_b[:, None], small, cfg=self.cfg)
    cache = _rows_to_cache(cache, out.kv_rows, pos_b[:, None])
    return out.logits[:, 0], self._constrain(cache)

  def _sample_fn(self, state: SlotState, logits_bv, allowed_bits, *, options, logprobs):
    """Next tokens from the logits (masked by `allowed_bits` where given); the state moves on."""
    b = self.max_slots
    logits_bv = self._spellable(logits_bv)
    tok_b = sample(logits_bv, state.sp, state.counts_bv, state.prompt_bv, options, self._unpack(allowed_bits, b))
    lps = None if logprobs is None else token_logprobs(logits_bv, tok_b, logprobs)
    act = state.active_b
    counts = state.counts_bv.at[jnp.arange(b), tok_b].add(act.astype(jnp.int32))
    sp = state.sp._replace(step=state.sp.step + act.astype(jnp.uint32))
    state = state._replace(tokens_b=jnp.where(act, tok_b, state.tokens_b),
                           positions_b=state.positions_b + act.astype(jnp.int32), sp=sp, counts_bv=counts)
    return tok_b, lps, self._pin_state(state)

  def _on_mesh(self, fn):
    """Traces `fn` with the MoE layers dispatching per shard (their kernels run on local experts)."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
      with moe_parallel.use_mesh(self.mesh):
        return fn(*args, **kwargs)
    return traced

  def _pin_state(self, state):
    """Slot state stays replicated over the mesh. Were its sharding left to each program, the next
    call would see new input shardings and recompile (the second prefill did, for seconds)."""
    if self._state_sharding is None:
      return state
    return jax.lax.with_sharding_constraint(state, self._state_sharding)

  def _constrain(self, cache):
    if self._cache_shardings is None:
      return cache
    return jax.lax.with_sharding_constraint(cache, self._cache_shardings)

  # ---------------------------------------------------------------- outputs
  def _consume(self, toks_b: np.ndarray, lps, rows):
    for j, i, r in rows:
      if r.done or self.slots[i] is not r:
        continue  # finished (or cancelled) while this step was in flight
      if r.params.logprobs is not None:
        r.logprobs += _logprob_entries(lps, [j], toks_b, r.params.logprobs)
      self._emit(r, int(toks_b[j]))
    for i, r in enumerate(self.slots):
      if r is not None and r.done:
        self._free(i)

  def _emit(self, r: Request, tok: int):
    p = r.params
    r.output_ids.append(tok)
    r._last_token_at = self.metrics.token(r._arrived, r._last_token_at, first=len(r.output_ids) == 1)
    if tok in p.stop_ids(self.eos_ids):   # held back on device for the first min_tokens
      return self._finish(r, "stop")
    if r.guide is not None and not r.guide.advance(tok):   # cannot happen unless the mask is wrong
      return self._finish(r, "abort")
    if r._decoder is not None:
      r.text += r._decoder.push(tok)
      for s in p.stop if len(r.output_ids) >= p.min_tokens else ():
        k = r.text.find(s, max(0, r._emitted - len(s) + 1))   # ends in text not yet sent
        if k >= 0:
          r.text = r.text[:k + len(s) * p.include_stop_str_in_output]
          return self._finish(r, "stop", flush=False)
    if r.guide is not None and r.guide.finished:   # the grammar is complete: no stop token needed
      return self._finish(r, "stop")
    if len(r.output_ids) >= self._token_limit(r):
      return self._finish(r, "length")
    hold = max((len(s) - 1 for s in p.stop), default=0)   # a stop string may still be forming
    safe = max(r._emitted, len(r.text) - hold)
    r.events.put(Delta([tok], r.text[r._emitted:safe], logprobs=r.logprobs[-1:]))
    r._emitted = safe

  def _finish(self, r: Request, reason: str, flush: bool = True):
    if flush and r._decoder is not None:
      r.text += r._decoder.flush()
    r.finish_reason = reason
    self.metrics.finish(reason, r._arrived)
    last = slice(-1, None) if reason != "abort" else slice(0, 0)
    r.events.put(Delta(r.output_ids[last], r.text[r._emitted:], reason, logprobs=r.logprobs[last]))
    r._emitted = len(r.text)


def _logprob_entries(lps, rows, token_ids, width: int) -> list:
  """Host arrays (chosen [N], top ids [N, W], top logprobs [N, W]) -> a TokenLogprob for each
  row j in `rows` (its token token_ids[j]), with `width` alternatives."""
  chosen, ids, top = lps
  return [TokenLogprob(int(token_ids[j]), float(chosen[j]),
                       tuple(zip(ids[j, :width].tolist(), top[j, :width].tolist()))) for j in rows]

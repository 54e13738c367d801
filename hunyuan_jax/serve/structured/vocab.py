"""The vocabulary as bytes, and `Guide`: one request's position in its grammar."""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import numpy as np

from hunyuan_jax.serve.structured.grammar import Grammar


class TokenTable:
  """The vocabulary's bytes as a padded matrix, for masks over every token at once.

  Stop tokens are left out of the byte walk (a mask allows them only where the text is complete);
  other special tokens count as their text (a JSON string may hold "<|extra_0|>").
  """

  def __init__(self, token_bytes: Sequence[Optional[bytes]], vocab_size: int, stop_ids: Sequence[int]):
    self.vocab_size = vocab_size
    stop = set(int(i) for i in stop_ids)
    self.stop_ids = np.array(sorted(i for i in stop if 0 <= i < vocab_size), np.int64)
    lengths = np.zeros(vocab_size, np.int64)
    for i, b in enumerate(token_bytes[:vocab_size]):
      if b and i not in stop:
        lengths[i] = len(b)
    self.lengths = lengths
    self.bytes = np.zeros((vocab_size, max(1, int(lengths.max()))), np.uint8)
    for i in np.nonzero(lengths)[0]:
      self.bytes[i, :lengths[i]] = np.frombuffer(token_bytes[i], np.uint8)
    self.ids = np.nonzero(lengths)[0]
    self.columns = np.ascontiguousarray(self.bytes.T)   # [L, V]: byte d of every token, contiguous
    self._prefix_masks: dict = {}

  def prefix_mask(self, text: bytes) -> np.ndarray:
    """Packed bits of the tokens whose bytes begin `text` (forced text, in any tokenisation)."""
    if text not in self._prefix_masks:
      ok = (self.lengths > 0) & (self.lengths <= len(text))
      for d in range(min(len(text), self.columns.shape[0])):
        ok &= (self.columns[d] == text[d]) | (self.lengths <= d)
      self._prefix_masks[text] = np.packbits(ok)
    return self._prefix_masks[text]


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_table(tokenizer, vocab_size: int, stop_ids: Sequence[int]) -> TokenTable:
  """The tokenizer's table (built once per tokenizer and vocabulary: seconds for 128K tokens)."""
  key = (vocab_size, tuple(sorted(stop_ids)))
  tables = _TABLES.setdefault(tokenizer, {})
  if key not in tables:
    n = min(vocab_size, tokenizer.vocab_size)
    tables[key] = TokenTable([_bytes_or_none(tokenizer, i) for i in range(n)], vocab_size, stop_ids)
  return tables[key]


def _bytes_or_none(tokenizer, i: int) -> Optional[bytes]:
  try:
    return tokenizer.token_bytes(i)
  except KeyError:   # a reserved id with no text
    return None


class Guide:
  """One request's position in its grammar: the tokens it may take next, and the token it took.

  think_budget (vLLM's `thinking_token_budget`): after that many reasoning tokens the reply must
  take the grammar's `think_close` text next (in whatever tokens the model picks for it).
  """

  def __init__(self, grammar: Grammar, table: TokenTable, think_budget: Optional[int] = None):
    self.grammar, self.table, self.state = grammar, table, grammar.start
    self.think_budget, self.think_tokens = think_budget, 0
    self._forced = b""
    self._spend_budget()

  def allowed_bits(self) -> np.ndarray:
    if self._forced:
      return self.table.prefix_mask(self._forced)
    return self.grammar.mask(self.state, self.table)

  def advance(self, token_id: int) -> bool:
    """Moves past a sampled token; False if the grammar does not allow it (then the state stays)."""
    if token_id in self.table.stop_ids:
      return not self._forced and self.grammar.accepting(self.state)
    n = int(self.table.lengths[token_id]) if 0 <= token_id < self.table.vocab_size else 0
    text = bytes(self.table.bytes[token_id, :n])
    if n == 0 or not self._forced.startswith(text[:len(self._forced)]):
      return False
    sid = self.state
    for b in text:
      sid = self.grammar.step(sid, b)
      if sid < 0:
        return False
    if self.think_budget is not None and self.grammar.in_reasoning(self.state):
      self.think_tokens += 1
    self._forced = self._forced[n:]
    self.state = sid
    self._spend_budget()
    return True

  def _spend_budget(self):
    if (self.think_budget is not None and self.think_tokens >= self.think_budget
        and self.grammar.in_reasoning(self.state)):
      self._forced, self.think_budget = self.grammar.think_close, None

  @property
  def finished(self) -> bool:
    """Complete, and no byte can follow: the reply is over without a stop token."""
    return self.grammar.accepting(self.state) and not self.grammar.can_continue(self.state)

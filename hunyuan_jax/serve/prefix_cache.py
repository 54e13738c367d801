"""Prefix caching over the engine's slots: which free slot a request takes, and how many rows of
its prompt it finds already computed.

A slot's rows stay in the cache after its request ends, so the engine remembers the tokens they
hold (`Request.rows_written` at the end). A new request goes to the free slot whose rows share
the longest prefix with its prompt (the previous turn of a conversation), or, where a busy slot
shares more (a common system prompt), that slot's rows are copied into a free one. With no
match the least recently freed slot is taken, so recent conversations keep their rows longest.
A request whose prefix a slot is still prefilling waits for it (n choices of one prompt).
"""
from __future__ import annotations

import itertools

import numpy as np

MIN_COPY = 16   # shared tokens worth a copy (or a wait): more than a busy slot adds over the best free one


class SlotPrefixes:
  def __init__(self, num_slots: int):
    self.held = [[]] * num_slots      # a free slot's tokens, from position 0
    self.freed_at = [0] * num_slots   # when each slot was last freed
    self._clock = itertools.count(1)

  def freed(self, slot: int, tokens: list) -> None:
    self.held[slot] = tokens
    self.freed_at[slot] = next(self._clock)

  def forget(self) -> None:
    """Nothing held any more (a failed program may have lost the cache)."""
    self.held = [[]] * len(self.held)

  def place(self, prompt_ids: list, slots: list, reuse: bool) -> tuple[int, int, int]:
    """(the free slot a prompt takes, the slot whose rows it starts from, how many of them it
    keeps). `slots`: the engine's requests (None where free); `reuse` False: no rows kept."""
    free = [i for i, s in enumerate(slots) if s is None]
    oldest = min(free, key=self.freed_at.__getitem__)
    if not reuse:
      return oldest, oldest, 0
    prompt = prompt_ids[:-1]   # the last prompt token runs: its logits give the first output
    match = [common_prefix(prompt, self.held[i] if s is None else s.rows_written()) for i, s in enumerate(slots)]
    best_free = max(free, key=lambda i: (match[i], -self.freed_at[i]))
    best = max(range(len(slots)), key=match.__getitem__)
    if match[best] >= match[best_free] + MIN_COPY:   # a busy slot shares more: copy its rows
      return oldest, best, match[best]
    return best_free, best_free, match[best_free]

  @staticmethod
  def prefill_to_share(prompt_ids: list, slots: list, have: int) -> bool:
    """Whether a slot still prefilling will hold more of the prompt (MIN_COPY tokens at least)
    than the `have` rows it could start from now: it then waits for those rows instead of
    computing them again beside them."""
    for s in slots:
      if s is not None and s.prefilled < len(s.prompt_ids):
        shared = common_prefix(prompt_ids[:-1], s.prompt_ids)
        if shared > have and shared >= MIN_COPY:
          return True
    return False


def common_prefix(a: list, b: list) -> int:
  """Length of the common prefix of two token lists, compared in growing slices: unrelated
  prompts cost one short comparison, not a conversion of two whole contexts."""
  n, k, width = min(len(a), len(b)), 0, 64
  while k < n:
    hi = min(n, k + width)
    diff = np.flatnonzero(np.asarray(a[k:hi]) != np.asarray(b[k:hi]))
    if len(diff):
      return k + int(diff[0])
    k, width = hi, width * 4
  return n

"""Deterministic, resumable packed batches from text, jsonl or pre-tokenized arrays.

Sources (DataConfig.path; a file, a folder, a glob, or several joined by commas):
  *.txt / *.py / other text   one document per file
  *.jsonl                     one document per line, the `field` key (default "text")
  *.npy                       pre-tokenized: 1-D token stream (documents end at the eos id) or
                              2-D [N, L] rows, one document per row
With no path, the corpus is the Python standard library's source (`sysconfig` "stdlib"), a
text every machine with Python has: the embedded default for the tiny byte-level model.

Packing: documents (each followed by eos) are concatenated and cut into rows of seq_len + 1
tokens; a document that does not fit continues in the next row. `segment_ids` number the
documents inside a row from 1 (so attention never crosses documents), `positions` restart at 0
in each segment, and `loss_mask` drops the target that crosses a document boundary.

Order: files are shuffled per epoch with `seed + epoch`; documents within a file keep their order.
The iterator state (epoch, file, document, token offset) is a small dict saved in the checkpoint;
`PackedBatches.restore(state)` resumes at exactly the next batch.
"""
from __future__ import annotations

import glob
import json
import os
import sysconfig
from typing import Iterator, Optional

import numpy as np

from hunyuan_jax.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer


def stdlib_files() -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
    files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
  if not files:
    raise FileNotFoundError(f"no *.py files under the standard library folder {root!r}; "
                            "pass --config.data.path=<your text files>")
  return files


def resolve_files(path: Optional[str]) -> list[str]:
  if not path:
    return stdlib_files()
  files = []
  for part in path.split(","):
    if os.path.isdir(part):
      files += sorted(os.path.join(dp, f) for dp, _, fs in os.walk(part) for f in fs)
    else:
      matched = sorted(glob.glob(part))
      if not matched:
        raise FileNotFoundError(f"data path {part!r} matches no file; pass a file, folder or glob")
      files += matched
  return files


def pick_tokenizer(vocab_size: int, tokenizer: Optional[str], model_path: str) -> Tokenizer:
  if tokenizer:
    return load_tokenizer(tokenizer)
  if vocab_size == ByteTokenizer().vocab_size:
    return ByteTokenizer()
  if os.path.isdir(model_path):
    return load_tokenizer(model_path)
  raise ValueError(f"the model's vocab ({vocab_size}) is not byte-level and {model_path!r} is not a "
                   "model folder: pass --config.data.tokenizer=<folder with hy.tiktoken or tokenizer.json>")


class Documents:
  """Token documents of one file, in order."""

  def __init__(self, tokenizer: Tokenizer, field: str):
    self.tok, self.field = tokenizer, field
    self.eos = tokenizer.eos_ids[0]

  def _encode(self, text: str) -> np.ndarray:
    try:
      ids = self.tok.encode(text, allow_special=False)
    except TypeError:
      ids = self.tok.encode(text)
    return np.asarray(list(ids) + [self.eos], np.int32)

  def read(self, path: str, skip: int = 0) -> Iterator[np.ndarray]:
    """The file's documents from index `skip` on (skipped ones are not tokenized)."""
    if path.endswith(".npy"):
      arr = np.load(path, mmap_mode="r")
      if arr.ndim == 2:
        for row in arr[skip:]:
          yield np.asarray(row, np.int32)
        return
      bounds = list(np.flatnonzero(np.asarray(arr) == self.eos) + 1)
      if not bounds or bounds[-1] != len(arr):
        bounds.append(len(arr))
      starts = [0] + bounds[:-1]
      for start, end in list(zip(starts, bounds))[skip:]:
        yield np.asarray(arr[start:end], np.int32)
    elif path.endswith(".jsonl"):
      with open(path, encoding="utf-8") as f:
        lines = (line for line in f if line.strip())
        for n, line in enumerate(lines):
          if n < skip:
            continue
          record = json.loads(line)
          if self.field not in record:
            raise KeyError(f"{path}: document {n} has no {self.field!r} key; set --config.data.field")
          yield self._encode(record[self.field])
    elif skip == 0:
      with open(path, encoding="utf-8", errors="replace") as f:
        yield self._encode(f.read())


class PackedBatches:
  """Iterator of packed numpy batches {inputs, targets, positions, segment_ids, loss_mask} [B, T]."""

  def __init__(self, files: list[str], tokenizer: Tokenizer, batch_size: int, seq_len: int,
               seed: int = 0, field: str = "text"):
    if not files:
      raise ValueError("no data files")
    self.files, self.docs = files, Documents(tokenizer, field)
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
    self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    self.state = {"epoch": 0, "file": 0, "doc": 0, "offset": 0}
    self._stream = None

  # ---- position -------------------------------------------------------------------------
  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng(self.seed + epoch).permutation(len(self.files))

  def get_state(self) -> dict:
    return dict(self.state)

  def restore(self, state: dict) -> None:
    self.state = {k: int(state[k]) for k in ("epoch", "file", "doc", "offset")}
    self._stream = None

  def _row(self) -> tuple[np.ndarray, np.ndarray]:
    n = self.seq_len + 1
    tokens = np.full(n, self.pad, np.int32)
    segs = np.zeros(n, np.int32)
    filled, seg = 0, 0
    while filled < n:
      piece = next(self._stream)
      take = min(len(piece), n - filled)
      seg += 1
      tokens[filled:filled + take], segs[filled:filled + take] = piece[:take], seg
      filled += take
      self._advance(take, len(piece))
    return tokens, segs

  def _advance(self, taken: int, remaining: int) -> None:
    s = self.state
    if taken < remaining:
      s["offset"] += taken
    else:
      s["doc"], s["offset"] = s["doc"] + 1, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._stream is None:
      self._stream = self._pieces_from_state()
    rows = [self._row() for _ in range(self.batch_size)]
    return make_batch(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))

  def _pieces_from_state(self) -> Iterator[np.ndarray]:
    # The generator reads self.state each time it resumes, and _advance moves the state,
    # so a piece is never yielded twice and a restore restarts from exactly the saved spot.
    s = self.state
    while True:
      order = self._order(s["epoch"])
      if s["file"] >= len(order):
        s["epoch"], s["file"], s["doc"], s["offset"] = s["epoch"] + 1, 0, 0, 0
        continue
      file_at, first = s["file"], s["doc"]
      for d, doc in enumerate(self.docs.read(self.files[order[file_at]], skip=first), start=first):
        while s["file"] == file_at and s["doc"] == d and s["offset"] < len(doc):
          yield doc[s["offset"]:]
      if s["file"] == file_at:
        s["file"], s["doc"], s["offset"] = file_at + 1, 0, 0


def make_batch(rows_bl: np.ndarray, segs_bl: np.ndarray) -> dict[str, np.ndarray]:
  """Packed rows of seq_len + 1 tokens -> model inputs and shifted targets [B, seq_len]."""
  seg_in, seg_tgt = segs_bl[:, :-1], segs_bl[:, 1:]
  return {
      "inputs": rows_bl[:, :-1],
      "targets": rows_bl[:, 1:],
      "segment_ids": seg_in,
      "positions": segment_positions(seg_in),
      "loss_mask": ((seg_in == seg_tgt) & (seg_in > 0)).astype(np.float32),
  }


def segment_positions(segs_bt: np.ndarray) -> np.ndarray:
  """0, 1, 2, ... restarting wherever the segment id changes."""
  b, t = segs_bt.shape
  idx = np.broadcast_to(np.arange(t), (b, t))
  starts = np.concatenate([np.ones((b, 1), bool), segs_bt[:, 1:] != segs_bt[:, :-1]], axis=1)
  last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
  return (idx - last_start).astype(np.int32)

"""Streaming safetensors: read one tensor at a time, write shards one tensor at a time.

Reading uses `safetensors.safe_open` for the header (names, dtypes, shapes) and a plain positioned
read for the data: exactly one tensor's bytes land in a fresh numpy array and nothing stays mapped,
so the process's RSS measures what the converter holds (an mmap of a 5 GB shard would count its
touched pages). Writing plans each shard's header from the shapes first, then streams the tensors.
"""
from __future__ import annotations

import glob
import json
import os
import struct
from typing import Callable, Iterable, Optional

import ml_dtypes
import numpy as np
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def np_dtype(code: str) -> np.dtype:
  if code not in _DTYPES:
    raise ValueError(f"safetensors dtype {code!r} is not supported")
  return _DTYPES[code]


def st_code(dtype) -> str:
  return _NAMES[np.dtype(dtype)]


class TensorInfo:
  __slots__ = ("file", "code", "shape", "offset", "nbytes")

  def __init__(self, file, code, shape, offset, nbytes):
    self.file, self.code, self.shape, self.offset, self.nbytes = file, code, tuple(shape), offset, nbytes


def _header(path: str) -> tuple[int, dict]:
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n, json.loads(f.read(n))


class SafetensorsReader:
  """All tensors of a checkpoint folder (single file, or shards listed by the index)."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
      files = [os.path.join(path, x) for x in files]
    else:
      files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
      raise FileNotFoundError(f"no *.safetensors files (and no {INDEX_FILE}) in {path!r}")
    self.tensors: dict[str, TensorInfo] = {}
    for file in files:
      if not os.path.isfile(file):
        raise FileNotFoundError(f"{INDEX_FILE} in {path!r} lists {os.path.basename(file)!r}, which is missing")
      with safe_open(file, framework="np") as st:  # validates the header
        names = list(st.keys())
      data_start, header = _header(file)
      for name in names:
        meta = header[name]
        begin, end = meta["data_offsets"]
        if name in self.tensors:
          raise ValueError(f"tensor {name!r} appears in both {self.tensors[name].file} and {file}")
        self.tensors[name] = TensorInfo(file, meta["dtype"], meta["shape"], data_start + begin, end - begin)

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def names(self) -> list[str]:
    return list(self.tensors)

  def read(self, name: str) -> np.ndarray:
    info = self.tensors[name]
    with open(info.file, "rb") as f:
      f.seek(info.offset)
      buf = np.empty(info.nbytes, np.uint8)
      if f.readinto(memoryview(buf)) != info.nbytes:
        raise IOError(f"{info.file} is truncated while reading tensor {name!r}")
    return buf.view(np_dtype(info.code)).reshape(info.shape)


class PlannedTensor:
  __slots__ = ("name", "shape", "dtype", "produce")

  def __init__(self, name: str, shape, dtype, produce: Callable[[], np.ndarray]):
    self.name, self.shape, self.dtype, self.produce = name, tuple(shape), np.dtype(dtype), produce

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def write_sharded(out_dir: str, tensors: Iterable[PlannedTensor], max_shard_bytes: int,
                  metadata: Optional[dict] = None) -> list[str]:
  """Writes tensors (in order) into shards of at most `max_shard_bytes` plus the index file.

  Each tensor is produced, written and dropped before the next one is produced.
  """
  tensors = list(tensors)
  shards: list[list[PlannedTensor]] = [[]]
  size = 0
  for t in tensors:
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  os.makedirs(out_dir, exist_ok=True)
  single = len(shards) == 1
  files = ["model.safetensors" if single else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
           for i in range(len(shards))]
  weight_map = {}
  for file, shard in zip(files, shards):
    _write_shard(os.path.join(out_dir, file), shard, metadata or {"format": "pt"})
    weight_map.update({t.name: file for t in shard})
  if not single:
    total = sum(t.nbytes for t in tensors)
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return files


def _write_shard(path: str, shard: list[PlannedTensor], metadata: dict) -> None:
  header, offset = {"__metadata__": metadata}, 0
  for t in shard:
    header[t.name] = {"dtype": st_code(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for t in shard:
      x = np.ascontiguousarray(t.produce())
      if x.shape != t.shape or x.dtype != t.dtype:
        raise ValueError(f"tensor {t.name!r}: produced {x.shape} {x.dtype}, planned {t.shape} {t.dtype}")
      f.write(x.view(np.uint8).reshape(-1).data)
  os.replace(tmp, path)

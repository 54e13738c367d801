"""HF safetensors <-> params, streamed one layer slice at a time.

    SafetensorsReader ──► HFSource ──┬──► load_hf_checkpoint: params (host buffer per param, or
                                     │        one device shard at a time with `mesh`)
                                     ├──► orbax_io.write_orbax_streaming (one slice in RAM)
                                     └──► write_hf (re-layout)
    params ──► ParamsSource ─────────┴──► write_hf ──► safetensors shards (one tensor in RAM)

A *source* yields slices (one layer of one param, see hf_names.Slice); sinks pull from it. The
largest host allocation is one slice (one layer of one param, e.g. A13B's experts of one layer)
plus the tensor being read or written, never the whole model.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hunyuan_jax.checkpoint import hf_names
from hunyuan_jax.checkpoint.hf_names import Slice, path_str
from hunyuan_jax.checkpoint.safetensors_io import (FLOAT_CODES, PlannedTensor, SafetensorsReader, np_dtype,
                                                   write_sharded)
from hunyuan_jax.config import ModelConfig

DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3
_MAX_LISTED = 25


class CheckpointMismatchError(ValueError):
  """The checkpoint's tensors do not match the config; the message lists every problem."""


def flat_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  from hunyuan_jax.model import abstract_params
  leaves = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]
  return {tuple(k.key for k in kp): tuple(x.shape) for kp, x in leaves}


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


def _report(problems: dict[str, list[str]], where: str) -> None:
  lines = []
  for kind, items in problems.items():
    if items:
      shown = items[:_MAX_LISTED] + ([f"... and {len(items) - _MAX_LISTED} more"] if len(items) > _MAX_LISTED else [])
      lines.append(f"{kind} ({len(items)}):\n  " + "\n  ".join(shown))
  if lines:
    raise CheckpointMismatchError(f"checkpoint {where} does not match the config:\n" + "\n".join(lines) +
                                  "\nCheck that config.json belongs to these weights (or pass the right cfg).")


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
class HFSource:
  """Slices read from HF safetensors, with every name, shape and dtype validated up front."""

  def __init__(self, path_or_reader, cfg: ModelConfig, dtype=None):
    self.reader = (path_or_reader if isinstance(path_or_reader, SafetensorsReader)
                   else SafetensorsReader(path_or_reader))
    self.cfg = cfg
    self.shapes = flat_shapes(cfg)
    self.plan: dict[tuple[str, ...], list[tuple[Slice, hf_names.Alternative]]] = {}
    self.dtypes: dict[tuple[str, ...], np.dtype] = {}
    problems = {"missing tensors": [], "shape mismatches": [], "non-float tensors": [],
                "unexpected tensors": []}
    used: set[str] = set()
    info = self.reader.tensors
    for path, shape in self.shapes.items():
      entries, codes = [], []
      for sl in hf_names.param_slices(cfg, path, shape):
        alts = hf_names.import_alternatives(cfg, sl)
        best = max(alts, key=lambda a: sum(n in info for n in a.sources))  # first wins ties
        missing = [n for n in best.sources if n not in info]
        for n in missing:
          others = [a for a in alts if a is not best]
          hint = f" (or {next(iter(others[0].sources))}...)" if others else ""
          problems["missing tensors"].append(f"{n}{hint} -> {path_str(path)}")
        for n, want in best.sources.items():
          if n in missing:
            continue
          used.add(n)
          if info[n].shape != want:
            problems["shape mismatches"].append(f"{n}: file {list(info[n].shape)}, config expects {list(want)}")
          if info[n].code not in FLOAT_CODES:
            problems["non-float tensors"].append(f"{n}: {info[n].code}")
          codes.append(info[n].code)
        entries.append((sl, best))
      self.plan[path] = entries
      self.dtypes[path] = self._out_dtype(path, codes, dtype)
    ignored = hf_names.ignored_name_rules(cfg)
    for name in self.reader.names():
      if name not in used and not any(rule.match(name) for rule, _ in ignored):
        problems["unexpected tensors"].append(
            f"{name} {list(info[name].shape)} (no param takes it: wrong config, or a layout this converter "
            "does not know)")
    _report(problems, repr(self.reader.path))

  @staticmethod
  def _out_dtype(path, codes, dtype) -> np.dtype:
    if path[-1] == "expert_bias":  # an fp32 buffer in every reference (spec trap 11)
      return np.dtype(np.float32)
    if dtype is not None:
      return np.dtype(jnp.dtype(dtype))
    floats = [np_dtype(c) for c in codes if c in FLOAT_CODES]
    return np.result_type(*floats) if floats else np.dtype(np.float32)

  def dtype(self, path) -> np.dtype:
    return self.dtypes[path]

  def fill(self, sl: Slice, out: np.ndarray) -> None:
    alt = next(a for s, a in self.plan[sl.path] if s == sl)
    alt.fill(out, self.reader.read)

  def read(self, sl: Slice) -> np.ndarray:
    out = np.empty(sl.shape, self.dtypes[sl.path])
    self.fill(sl, out)
    return out


class ParamsSource:
  """Slices of an in-memory params tree (numpy or jax arrays, any sharding)."""

  def __init__(self, params, cfg: ModelConfig):
    self.cfg = cfg
    self.shapes = flat_shapes(cfg)
    leaves = {tuple(k.key for k in kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    problems = {"missing params": [p for p in map(path_str, self.shapes) if tuple(p.split("/")) not in leaves],
                "unexpected params": [path_str(p) for p in leaves if p not in self.shapes],
                "shape mismatches": [f"{path_str(p)}: {list(np.shape(x))}, config expects {list(self.shapes[p])}"
                                     for p, x in leaves.items() if p in self.shapes and
                                     tuple(np.shape(x)) != self.shapes[p]]}
    _report(problems, "params tree")
    self.leaves = leaves

  def dtype(self, path) -> np.dtype:
    return np.dtype(self.leaves[path].dtype)

  def read(self, sl: Slice) -> np.ndarray:
    x = self.leaves[sl.path]
    return np.asarray(x if sl.index is None else x[sl.index])


# ---------------------------------------------------------------------------------------------
# HF -> params
# ---------------------------------------------------------------------------------------------
def _host_param(src: HFSource, path) -> np.ndarray:
  shape, entries = src.shapes[path], src.plan[path]
  buf = np.empty(shape, src.dtype(path))
  for sl, _ in entries:
    src.fill(sl, buf if sl.index is None else buf[sl.index])
  return buf


def _sharded_param(src: HFSource, path, sharding) -> jax.Array:
  """Builds each distinct device shard layer by layer; no full copy of the param exists on the host."""
  shape, entries = src.shapes[path], src.plan[path]
  stacked = entries[0][0].index is not None
  done: dict[tuple, np.ndarray] = {}

  def shard(index: tuple) -> np.ndarray:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    key = tuple((s.start, s.stop) for s in index)
    if key not in done:
      if not stacked:
        whole = src.read(entries[0][0])
        done[key] = np.ascontiguousarray(whole[index])
      else:
        layers = range(*index[0].indices(shape[0]))
        rest = index[1:]
        full = all(s.indices(n) == (0, n, 1) for s, n in zip(rest, shape[1:]))
        out = np.empty((len(layers),) + tuple(len(range(*s.indices(n))) for s, n in zip(rest, shape[1:])),
                       src.dtype(path))
        for k, r in enumerate(layers):
          if full:
            src.fill(entries[r][0], out[k])
          else:
            out[k] = src.read(entries[r][0])[rest]
        done[key] = out
    return done[key]

  return jax.make_array_from_callback(shape, sharding, shard)


def params_from_hf(src: HFSource, mesh=None, quantization: str = "none") -> dict:
  """All params as jax arrays: one param on the host at a time, or one device shard with `mesh`.
  quantization "fp8": the routed experts in the serving layout of hunyuan_jax.quant.fp8."""
  shardings = None
  if mesh is not None:
    from hunyuan_jax.sharding import param_shardings
    leaves = jax.tree_util.tree_flatten_with_path(param_shardings(src.cfg, mesh))[0]
    shardings = {tuple(k.key for k in kp): s for kp, s in leaves}
  fp8 = quantization not in (None, "", "none")
  flat = {}
  for path in src.shapes:
    if fp8 and path[-2:] in (("moe", "wi"), ("moe", "wo")):
      if path[-1] == "wi":
        flat.update(_fp8_experts(src, path[:-1], shardings))
    elif shardings is None:
      flat[path] = jnp.asarray(_host_param(src, path))
    else:
      flat[path] = _sharded_param(src, path, shardings[path])
  return unflatten(flat)


def _fp8_experts(src: HFSource, moe: tuple, shardings) -> dict:
  """A MoE layer stack's routed experts quantized on the host one layer at a time (the bf16
  stack never exists whole), then placed: {path: array} of quant.fp8's serving layout."""
  from hunyuan_jax.quant.fp8 import host_quantize_layer, serving_shardings
  wi, wo = moe + ("wi",), moe + ("wo",)
  stacked = src.plan[wi][0][0].index is not None
  if not stacked:
    parts = host_quantize_layer(_host_param(src, wi), _host_param(src, wo))
  else:
    n = src.shapes[wi][0]
    bi = np.empty(src.shapes[wi][1:], src.dtype(wi))
    bo = np.empty(src.shapes[wo][1:], src.dtype(wo))
    parts = {}
    for r in range(n):
      src.fill(src.plan[wi][r][0], bi)
      src.fill(src.plan[wo][r][0], bo)
      for key, x in host_quantize_layer(bi, bo).items():
        parts.setdefault(key, np.empty((n,) + x.shape, x.dtype))[r] = x
  place = serving_shardings(shardings[wi], shardings[wo], int(stacked)) if shardings else None
  return {moe + (key,): jax.device_put(x, place[key]) if place else jnp.asarray(x) for key, x in parts.items()}


def load_hf_checkpoint(path: str, cfg: Optional[ModelConfig] = None, *, mesh=None,
                       dtype=None, quantization: str = "none") -> tuple[ModelConfig, dict]:
  """Reads config.json (unless `cfg` is given) and the safetensors in `path` -> (cfg, params).

  Tensors keep the file's dtype unless `dtype` asks for a cast (the Hy3 expert bias stays fp32).
  With `mesh`, each param is placed with its `sharding.param_shardings` sharding, shard by shard.
  The returned cfg has `param_dtype` set to the embedding's dtype.
  """
  cfg = cfg or ModelConfig.from_pretrained(path)
  src = HFSource(path, cfg, dtype)
  params = params_from_hf(src, mesh, quantization)
  emb = np.dtype(src.dtype(("embed",))).name
  if emb in ("bfloat16", "float16", "float32") and emb != cfg.param_dtype:
    cfg = cfg.replace(param_dtype=emb)
  return cfg, params


# ---------------------------------------------------------------------------------------------
# source -> HF
# ---------------------------------------------------------------------------------------------
def _slices_in_hf_order(src) -> list[Slice]:
  slices = [sl for path, shape in src.shapes.items() for sl in hf_names.param_slices(src.cfg, path, shape)]
  rank = {"embed": 0, "final_norm": 2, "lm_head": 3}
  return sorted(slices, key=lambda sl: (rank.get(sl.path[0], 1), -1 if sl.layer is None else sl.layer))


def export_plan(src, layout: str = "hub") -> list[PlannedTensor]:
  """The HF tensors of `src` in file order; each is cut from its slice when produced."""
  current: dict[str, Any] = {"slice": None, "value": None}

  def producer(sl, cut):
    def produce():
      if current["slice"] != sl:  # a slice's tensors are consecutive: each slice is read once
        current["slice"], current["value"] = sl, None
        current["value"] = src.read(sl)
      return cut(current["value"])
    return produce

  plan = []
  for sl in _slices_in_hf_order(src):
    for name, shape, cut in hf_names.export_tensors(src.cfg, sl, layout):
      plan.append(PlannedTensor(name, shape, src.dtype(sl.path), producer(sl, cut)))
  return plan


def write_hf(src, out_dir: str, *, layout: str = "hub", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Writes config.json, generation_config.json and safetensors shards from a source."""
  from hunyuan_jax.checkpoint.hf_config import generation_config, to_hf_config
  cfg = src.cfg
  os.makedirs(out_dir, exist_ok=True)
  hf = to_hf_config(cfg)
  hf["torch_dtype"] = np.dtype(src.dtype(("embed",))).name
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump(generation_config(cfg), f, indent=2)
  return write_sharded(out_dir, export_plan(src, layout), max_shard_bytes)


def save_hf_checkpoint(params, cfg: ModelConfig, out_dir: str, *, layout: str = "hub",
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """params -> HF folder (per-expert Hub names by default; layout="fused" for transformers v5 names)."""
  return write_hf(ParamsSource(params, cfg), out_dir, layout=layout, max_shard_bytes=max_shard_bytes)

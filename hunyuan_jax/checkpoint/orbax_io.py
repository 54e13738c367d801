"""Params-only orbax checkpoints, in one on-disk format with two writers and two readers.

Format: an orbax PyTree checkpoint without OCDBT, zarr v2, one array folder per param
(`groups_0.layer_0.moe.wi/`). Stacked params are chunked one layer per chunk.

  save_orbax(params, path)           orbax itself writes an in-memory params tree
  write_orbax_streaming(src, path)   tensorstore writes one layer slice at a time from any source
                                     (HF safetensors), plus the metadata orbax 0.12 writes, so
                                     converting a checkpoint never holds the model in RAM
  restore_orbax(path, cfg, mesh)     orbax restores straight into the target shardings
  OrbaxSource(path, cfg)             tensorstore reads one layer slice at a time (orbax -> HF)
"""
from __future__ import annotations

import json
import os
import time
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from hunyuan_jax.checkpoint import hf_names
from hunyuan_jax.checkpoint.hf import _report, flat_shapes, unflatten
from hunyuan_jax.config import ModelConfig


def _handler() -> ocp.PyTreeCheckpointHandler:
  return ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False)


def save_orbax(params, path: str) -> None:
  """Writes a params tree (any sharding) as an orbax checkpoint at `path` (must not exist)."""
  path = os.path.abspath(path)
  with ocp.Checkpointer(_handler()) as ckptr:
    ckptr.save(path, args=ocp.args.PyTreeSave(params))


def _leaf_dir(path: str, key: tuple[str, ...]) -> str:
  return os.path.join(path, ".".join(key))


def stored_dtypes(path: str, cfg: ModelConfig) -> dict[tuple[str, ...], np.dtype]:
  """dtype of every param as stored (read from each array's zarr metadata)."""
  out, missing = {}, []
  for key in flat_shapes(cfg):
    meta = os.path.join(_leaf_dir(path, key), ".zarray")
    if not os.path.isfile(meta):
      missing.append(f"{'/'.join(key)} (no {meta})")
      continue
    with open(meta) as f:
      code = json.load(f)["dtype"]
    out[key] = np.dtype(jax.numpy.bfloat16) if code == "bfloat16" else np.dtype(code)
  _report({"missing params": missing}, repr(path))
  return out


def restore_orbax(path: str, cfg: ModelConfig, mesh=None) -> dict:
  """Restores params directly into `sharding.param_shardings(cfg, mesh)` (one device without mesh)."""
  path = os.path.abspath(path)
  shapes, dtypes = flat_shapes(cfg), stored_dtypes(path, cfg)
  if mesh is not None:
    from hunyuan_jax.sharding import param_shardings
    leaves = jax.tree_util.tree_flatten_with_path(param_shardings(cfg, mesh))[0]
    shardings = {tuple(k.key for k in kp): s for kp, s in leaves}
  else:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {k: one for k in shapes}
  target = unflatten({k: jax.ShapeDtypeStruct(shapes[k], dtypes[k], sharding=shardings[k]) for k in shapes})
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), target)
  with ocp.Checkpointer(_handler()) as ckptr:
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))


# ---------------------------------------------------------------------------------------------
# Streaming writer / reader (tensorstore, one layer slice at a time)
# ---------------------------------------------------------------------------------------------
def _zarr_spec(leaf_dir: str) -> dict:
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": leaf_dir}}


def _zarr_dtype(dtype: np.dtype) -> str:
  return "bfloat16" if dtype == np.dtype(jax.numpy.bfloat16) else dtype.str


def write_orbax_streaming(src, path: str) -> None:
  """Writes every param of `src` (HFSource or ParamsSource) slice by slice in the orbax format."""
  path = os.path.abspath(path)
  if os.path.exists(path):
    raise FileExistsError(f"orbax destination {path!r} exists; pick a new folder")
  tmp = path + ".orbax-tmp"
  os.makedirs(tmp, exist_ok=False)
  start = time.time_ns()
  tree_meta, array_meta = {}, []
  for key, shape in src.shapes.items():
    slices = hf_names.param_slices(src.cfg, key, shape)
    stacked = slices[0].index is not None
    chunks = [1] + list(shape[1:]) if stacked else list(shape)
    dtype = np.dtype(src.dtype(key))
    arr = ts.open({**_zarr_spec(_leaf_dir(tmp, key)),
                   "metadata": {"shape": list(shape), "chunks": chunks, "dtype": _zarr_dtype(dtype),
                                "compressor": {"id": "zstd", "level": 1}, "fill_value": None,
                                "dimension_separator": "."}},
                  create=True, open=False).result()
    for sl in slices:
      value = src.read(sl)
      (arr[sl.index] if stacked else arr).write(value).result()
      del value
    name = ".".join(key)
    tree_meta[str(key)] = {"key_metadata": [{"key": k, "key_type": 2} for k in key],
                           "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                                              "write_shape": chunks}}
    array_meta.append({"array_metadata": {"param_name": name, "write_shape": chunks, "chunk_shape": chunks,
                                          "ext_metadata": None}})
  # The metadata files orbax 0.12.8 writes for a non-OCDBT PyTree checkpoint.
  with open(os.path.join(tmp, "_METADATA"), "w") as f:
    json.dump({"tree_metadata": tree_meta, "use_ocdbt": False, "use_zarr3": False,
               "store_array_data_equal_to_fill_value": True, "custom_metadata": None}, f)
  os.makedirs(os.path.join(tmp, "array_metadatas"))
  with open(os.path.join(tmp, "array_metadatas", "process_0"), "w") as f:
    json.dump({"array_metadatas": array_meta}, f)
  with open(os.path.join(tmp, "_CHECKPOINT_METADATA"), "w") as f:
    json.dump({"item_handlers": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler",
               "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": start,
               "commit_timestamp_nsecs": time.time_ns(), "custom_metadata": {}}, f)
  os.replace(tmp, path)


class OrbaxSource:
  """Slices of a params checkpoint on disk, read with tensorstore one layer at a time."""

  def __init__(self, path: str, cfg: ModelConfig):
    self.path, self.cfg = os.path.abspath(path), cfg
    self.shapes = flat_shapes(cfg)
    self.dtypes = stored_dtypes(self.path, cfg)
    self.arrays = {}
    bad = []
    for key, shape in self.shapes.items():
      arr = ts.open(_zarr_spec(_leaf_dir(self.path, key)), open=True).result()
      if tuple(arr.shape) != shape:
        bad.append(f"{'/'.join(key)}: stored {list(arr.shape)}, config expects {list(shape)}")
      self.arrays[key] = arr
    _report({"shape mismatches": bad}, repr(self.path))

  def dtype(self, key) -> np.dtype:
    return self.dtypes[key]

  def read(self, sl: hf_names.Slice) -> np.ndarray:
    arr = self.arrays[sl.path]
    return np.asarray((arr if sl.index is None else arr[sl.index]).read().result())


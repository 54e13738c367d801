"""Mesh construction and the ONE table that maps logical axes to mesh axes.

Model code names only logical axes (`embed`, `heads`, `experts`, ...). Changing the
parallelism of a run is a change of mesh shape, never of model code. A logical axis whose
size the mapped mesh axes do not divide is replicated instead (e.g. A13B's odd vocab 128167).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axes (in order). Batch-like axes spread over every axis that holds
# different data; parameters shard their `embed` dim over fsdp (ZeRO-3 style).
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "length": (),
    "cache_length": (),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "experts": ("expert",),
    "layers": (),
    "norm": (),
}


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all (or the given) devices; one axis may be -1 to take the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = [data, fsdp, expert, tensor]
  if shape.count(-1) > 1:
    raise ValueError("at most one mesh axis may be -1")
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    shape[shape.index(-1)] = len(devices) // rest
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"but {len(devices)} are present; set the mesh flags so their product matches")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_mesh_spec(logical: P | Sequence | None, shape: Sequence[int], mesh: Mesh) -> P:
  """Maps one logical PartitionSpec to a mesh PartitionSpec, dropping axes that do not divide."""
  if logical is None:
    return P()
  used: set[str] = set()
  out = []
  for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
    if name is None:
      out.append(None)
      continue
    if name not in LOGICAL_RULES:
      raise KeyError(f"logical axis {name!r} has no rule in hunyuan_jax.sharding.LOGICAL_RULES")
    axes = [a for a in LOGICAL_RULES[name] if a in mesh.shape and mesh.shape[a] > 1 and a not in used]
    # Keep the longest prefix of mesh axes whose product divides the dim.
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes.pop()
    used.update(axes)
    out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*out)


def shardings_for(logical_tree: Any, shapes_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree given its logical specs and its shapes (arrays or ShapeDtypeStructs)."""
  is_spec = lambda x: isinstance(x, P) or x is None
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, _short(logical_to_mesh_spec(spec, x.shape, mesh))),
      logical_tree, shapes_tree, is_leaf=is_spec)


def _short(spec: P) -> P:
  """Drops trailing None: jit returns specs in this form, and an array passed back in with the long
  form counts as a new sharding (the engine's second prefill recompiled for seconds)."""
  parts = list(spec)
  while parts and parts[-1] is None:
    parts.pop()
  return P(*parts)


def param_shardings(cfg, mesh: Mesh) -> Any:
  from hunyuan_jax.model import abstract_params, param_logical_axes
  return shardings_for(param_logical_axes(cfg), abstract_params(cfg), mesh)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """[B, T, ...] inputs: batch over the data-like axes."""
  spec = logical_to_mesh_spec(P("batch", *([None] * (ndim - 1))), (_divisible_batch(mesh),) + (1,) * (ndim - 1), mesh)
  return NamedSharding(mesh, spec)


def _divisible_batch(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"] if a in mesh.shape)

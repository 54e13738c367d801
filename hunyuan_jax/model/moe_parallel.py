"""Expert and data parallel MoE: `moe_ffn` run per shard under `jax.shard_map`.

Tokens are sharded over the batch axes (data, fsdp, expert), routed experts over `expert`,
their FFN width over `tensor` (the LOGICAL_RULES of hunyuan_jax/sharding.py). Per shard:

    x [B_l, T, H] --all_gather(expert)--> tokens of the expert group [n_ep * B_l * T, H]
      --moe_ffn with the local expert slice--> partial y (only the local experts contribute)
      --psum(tensor)--> --psum_scatter(expert)--> y [B_l, T, H]

This is the all-gather / reduce-scatter transport ("ring of experts" in MaxText): it gathers
tokens before the k-fold copy, which suits top-8, and needs no ragged all-to-all. Router
statistics are averaged over the batch axes, so they equal the unsharded ones. With a
capacity (`moe_capacity_factor`), the capacity is per expert group's tokens, not global.

The dispatch is chosen at trace time: a step traced inside `use_mesh(mesh)` runs this path
whenever the mesh has more than one device; `moe.MoE` asks `active_mesh()`.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import jax
from jax.sharding import Mesh, PartitionSpec as P

from hunyuan_jax.sharding import logical_to_mesh_spec

_MESH: contextvars.ContextVar = contextvars.ContextVar("hunyuan_moe_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Optional[Mesh]):
  """MoE layers traced inside this context dispatch per shard over `mesh`."""
  token = _MESH.set(mesh if mesh is not None and mesh.size > 1 else None)
  try:
    yield
  finally:
    _MESH.reset(token)


def active_mesh() -> Optional[Mesh]:
  return _MESH.get()


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def moe_ffn_sharded(x_btd: jax.Array, w_router_de: jax.Array, bias_e: Optional[jax.Array],
                    wi_edkf: jax.Array, wo_efd: jax.Array, *, mesh: Mesh, cfg, top_k: int, dtype):
  """Routed experts over a mesh: y [B, T, H] fp32 and MoEStats (global averages)."""
  from hunyuan_jax.model.moe import moe_ffn  # moe.py imports this module

  b, t, d = x_btd.shape
  x_spec = logical_to_mesh_spec(P("batch", "length", None), x_btd.shape, mesh)
  wi_spec = logical_to_mesh_spec(P("experts", None, None, "mlp"), wi_edkf.shape, mesh)
  wo_spec = logical_to_mesh_spec(P("experts", "mlp", None), wo_efd.shape, mesh)
  batch_axes = _axes(x_spec[0])
  expert_axes = _axes(wi_spec[0])
  tensor_axes = _axes(wi_spec[3])
  gather = bool(expert_axes) and all(a in batch_axes for a in expert_axes)

  def per_shard(x, w_router, wi, wo, *maybe_bias):
    bias = maybe_bias[0] if maybe_bias else None
    bl = x.shape[0]
    x_td = x.reshape(bl * t, d)
    if gather:
      x_td = jax.lax.all_gather(x_td, expert_axes, tiled=True)
    offset = jax.lax.axis_index(expert_axes) * wi.shape[0] if expert_axes else 0
    y_td, stats = moe_ffn(x_td, w_router, bias, wi, wo, cfg=cfg, top_k=top_k, dtype=dtype,
                          expert_offset=offset)
    if tensor_axes:
      y_td = jax.lax.psum(y_td, tensor_axes)
    if gather:
      y_td = jax.lax.psum_scatter(y_td, expert_axes, scatter_dimension=0, tiled=True)
    elif expert_axes:  # tokens replicated over the expert axis: sum the experts' shares
      y_td = jax.lax.psum(y_td, expert_axes)
    if batch_axes:
      stats = jax.tree.map(lambda s: jax.lax.pmean(s, batch_axes), stats)
    return y_td.reshape(bl, t, d), stats

  args = [x_btd, w_router_de, wi_edkf, wo_efd] + ([bias_e] if bias_e is not None else [])
  in_specs = (x_spec, P(), wi_spec, wo_spec) + ((P(),) if bias_e is not None else ())
  # check_vma=False: the reference gmm's scan carry is not typed for manual axes. The gradients
  # of this path equal the single-device ones on every mesh (tests/test_train_mesh.py).
  fn = jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=(x_spec, P()),
                     check_vma=False)
  return fn(*args)

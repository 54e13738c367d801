"""Expert and data parallel MoE: `moe_ffn` run per shard under `jax.shard_map`.

Tokens are sharded over the batch axes (data, fsdp, expert), routed experts over `expert`,
their FFN width over `tensor` (the LOGICAL_RULES of hunyuan_jax/sharding.py). Per shard:

    x [B_l, T, H] --all_gather(expert)--> tokens of the expert group [n_ep * B_l * T, H]
      --moe_ffn with the local expert slice--> partial y (only the local experts contribute)
      --psum_scatter(expert)--> + shared expert partial --psum(tensor)--> y [B_l, T, H]

This is the all-gather / reduce-scatter transport ("ring of experts" in MaxText): it gathers
tokens before the k-fold copy, which suits top-8, and needs no ragged all-to-all. Router
statistics are averaged over the batch axes, so they equal the unsharded ones. With a
capacity (`moe_capacity_factor`), the capacity is per expert group's tokens, not global.

The shared expert runs here too, on the local tokens and the local FFN width: its partial sum
joins the routed one before the tensor all-reduce, so a tensor-parallel layer has one MoE
all-reduce, not two (at 2-GPU batch-1 decode the all-reduces are latency-bound: one per layer
less is 32 per step fewer). Where its width does not shard like the experts', GSPMD runs it.

The dispatch is chosen at trace time: a step traced inside `use_mesh(mesh)` runs this path
whenever the mesh has more than one device; `moe.MoE` asks `active_mesh()`.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import jax
import jax.numpy as jnp
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


def _expert_specs(wi, wo, mesh):
  """(wi spec, wo spec, expert mesh axes, tensor mesh axes) for bf16 experts or the serving
  layout's fp8 ones (quant.fp8: q [E, 2, F, H] / [E, H, F] with per-channel scales)."""
  from hunyuan_jax.quant import fp8
  if fp8.is_quantized(wi):
    qi = logical_to_mesh_spec(P("experts", None, "mlp", None), wi.q.shape, mesh)
    qo = logical_to_mesh_spec(P("experts", None, "mlp"), wo.q.shape, mesh)
    return fp8.Fp8Weight(qi, P(*qi[:3])), fp8.Fp8Weight(qo, P(*qo[:2])), _axes(qi[0]), _axes(qi[2])
  wi_spec = logical_to_mesh_spec(P("experts", None, None, "mlp"), wi.shape, mesh)
  wo_spec = logical_to_mesh_spec(P("experts", "mlp", None), wo.shape, mesh)
  return wi_spec, wo_spec, _axes(wi_spec[0]), _axes(wi_spec[3])


def moe_ffn_sharded(x_btd: jax.Array, w_router_de: jax.Array, bias_e: Optional[jax.Array],
                    wi_edkf: jax.Array, wo_efd: jax.Array, *, mesh: Mesh, cfg, top_k: int, dtype,
                    shared: Optional[tuple[jax.Array, jax.Array]] = None):
  """Routed experts (+ the shared expert's (wi [H, 2, F], wo [F, H])) over a mesh.

  Returns y [B, T, H] in fp32 and MoEStats (global averages)."""
  from hunyuan_jax.model.moe import moe_ffn  # moe.py imports this module
  from hunyuan_jax.model.layers import swiglu_ffn

  b, t, d = x_btd.shape
  x_spec = logical_to_mesh_spec(P("batch", "length", None), x_btd.shape, mesh)
  wi_spec, wo_spec, expert_axes, tensor_axes = _expert_specs(wi_edkf, wo_efd, mesh)
  batch_axes = _axes(x_spec[0])
  gather = bool(expert_axes) and all(a in batch_axes for a in expert_axes)
  shared_specs = None
  if shared is not None:
    shared_specs = (logical_to_mesh_spec(P(None, None, "mlp"), shared[0].shape, mesh),
                    logical_to_mesh_spec(P("mlp", None), shared[1].shape, mesh))
    if _axes(shared_specs[0][2]) != tensor_axes:   # its partial sums would not match the routed
      y, stats = moe_ffn_sharded(x_btd, w_router_de, bias_e, wi_edkf, wo_efd, mesh=mesh, cfg=cfg,
                                 top_k=top_k, dtype=dtype)
      return y + swiglu_ffn(x_btd, *shared, dtype).astype(jnp.float32), stats

  def per_shard(x, w_router, wi, wo, *rest):
    bias = rest[0] if bias_e is not None else None
    bl = x.shape[0]
    x_td = x.reshape(bl * t, d)
    if gather:
      x_td = jax.lax.all_gather(x_td, expert_axes, tiled=True)
    offset = jax.lax.axis_index(expert_axes) * jax.tree.leaves(wi)[0].shape[0] if expert_axes else 0
    y_td, stats = moe_ffn(x_td, w_router, bias, wi, wo, cfg=cfg, top_k=top_k, dtype=dtype,
                          expert_offset=offset)
    if gather:
      y_td = jax.lax.psum_scatter(y_td, expert_axes, scatter_dimension=0, tiled=True)
    elif expert_axes:  # tokens replicated over the expert axis: sum the experts' shares
      y_td = jax.lax.psum(y_td, expert_axes)
    if shared is not None:   # local tokens, local width: a partial sum over tensor like y_td's
      y_td = y_td + swiglu_ffn(x.reshape(1, bl * t, d), *rest[-2:], dtype, jnp.float32)[0]
    if tensor_axes:
      y_td = jax.lax.psum(y_td, tensor_axes)
    if batch_axes:
      stats = jax.tree.map(lambda s: jax.lax.pmean(s, batch_axes), stats)
    return y_td.reshape(bl, t, d), stats

  args = [x_btd, w_router_de, wi_edkf, wo_efd] + ([bias_e] if bias_e is not None else [])
  in_specs = (x_spec, P(), wi_spec, wo_spec) + ((P(),) if bias_e is not None else ())
  if shared is not None:
    args += list(shared)
    in_specs += shared_specs
  # check_vma=False: the reference gmm's scan carry is not typed for manual axes. The gradients
  # of this path equal the single-device ones on every mesh (tests/test_train_mesh.py).
  fn = jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=(x_spec, P()),
                     check_vma=False)
  return fn(*args)

"""The one place that papers over Pallas API differences between jax versions.

Checked against jax 0.10.2 (CPU here) and 0.11.2 (the GPU machine).
"""
import jax

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def num_sms() -> int:
  """Streaming multiprocessors of the default device, read from the device (never 132)."""
  try:
    mesh = jax.sharding.get_abstract_mesh()
    dev = getattr(mesh, "abstract_device", None)
    if dev is not None and getattr(dev, "num_cores", None):
      return int(dev.num_cores)
  except Exception:  # noqa: BLE001 - no abstract mesh API in this version
    pass
  count = getattr(jax.devices()[0], "core_count", None)
  if not count:
    raise RuntimeError("kernels_pallas: cannot read the SM count from the device; "
                       "pass backend='reference' to avoid the GPU kernel.")
  return int(count)


def mgpu():
  """(pl, plgpu) for Mosaic GPU; imported lazily so CPU-only installs never need it."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return pl, plgpu


def swizzle_transforms(cols, dtype):
  """Shared-memory tiling + swizzle for rows of `cols` elements (TMA and wgmma operands)."""
  _, plgpu = mgpu()
  itemsize = jax.numpy.dtype(dtype).itemsize
  swz = plgpu.find_swizzle(cols * itemsize * 8)
  return plgpu.TilingTransform((8, swz // itemsize)), plgpu.SwizzleTransform(swz)


def row_transforms(cols, dtype):
  """Tiling (1, 64) + 128-byte swizzle: rows of one swizzle row each, so a TMA copy reaches any
  row. Mosaic GPU's TMA through the (8, 64) tiling that wgmma takes divides the row index by 8
  (`TileTransform.transform_index`); both tilings lay out the same bytes (`row_aliased`)."""
  _, plgpu = mgpu()
  itemsize = jax.numpy.dtype(dtype).itemsize
  if cols * itemsize != 128:
    raise ValueError(f"row_transforms: rows of {cols} x {itemsize} bytes; 128 are needed")
  return plgpu.TilingTransform((1, cols)), plgpu.SwizzleTransform(128)


def row_aliased(shape, dtype):
  """One shared-memory buffer with two views of its bytes: (row view, tiled view).

  TMA copies go through the row view (`row_transforms`), wgmma and register stores through the
  tiled one (`swizzle_transforms`)."""
  _, plgpu = mgpu()
  return plgpu.RefUnion(plgpu.SMEM(shape, dtype, transforms=row_transforms(shape[-1], dtype)),
                        plgpu.SMEM(shape, dtype, transforms=swizzle_transforms(shape[-1], dtype)))


def with_row_view_input(allocs, dtype):
  """A warp-specialised pipeline's `get_allocations()` with its first input's buffer replaced by
  `row_aliased` views (to pass to `pl.run_scoped`). The dict's keys are the pipeline's own
  (jax 0.10-0.11); `split_row_view_input` undoes it inside the scope."""
  refs = list(allocs["flat_in_smem_refs"])
  refs[0] = row_aliased(refs[0].shape, dtype)
  return {**allocs, "flat_in_smem_refs": refs}


def split_row_view_input(allocs):
  """Inside the scope: (allocations for the pipeline, which copies through the row view; the
  tiled view of the first input's buffer, for wgmma)."""
  (rows, tiled), *rest = allocs["flat_in_smem_refs"]
  return {**allocs, "flat_in_smem_refs": [rows, *rest]}, tiled


def mgpu_kernel(body, *, out_type, **kwargs):
  """plgpu.kernel with the output keyword this version takes (out_type since 0.10)."""
  _, plgpu = mgpu()
  if JAX_VERSION >= (0, 10, 0):
    return plgpu.kernel(body, out_type=out_type, **kwargs)
  return plgpu.kernel(body, out_shape=out_type, **kwargs)


def tpu_params(dimension_semantics):
  from jax.experimental.pallas import tpu as pltpu
  cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
  return cls(dimension_semantics=dimension_semantics)


def mgpu_mlir():
  """(ir, arith, memref, gpu, mosaic_gpu) for code inlined with plgpu.inline_mgpu (per-thread
  loads and stores: Hopper's TMA has no scatter). jax keeps these MLIR bindings private."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, gpu, memref
  import jax.experimental.mosaic.gpu as mosaic_gpu
  return ir, arith, memref, gpu, mosaic_gpu

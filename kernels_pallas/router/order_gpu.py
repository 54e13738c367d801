"""The fused router's expert order on Hopper, from the fused kernel's block prefixes.

The fused kernel (gpu.py) writes, per 64-token block, the inclusive prefix counts of every
expert's picks. `expert_order` turns them into the stable expert order, its inverse, the group
sizes and the statistics' sums in one kernel; `expert_order_reference` is its jnp contract.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import _compat
from kernels_pallas.router.reference import inverse_permutation

BLOCK = 64        # tokens per warpgroup block: the rows of the wgmmas and of the order's blocks
CTA_TOKENS = 512  # tokens whose places one CTA of `expert_order` scatters (8 blocks)
STEP_BLOCKS = 128  # blocks per wgmma in its counts loop (H100: 14.0 us against 14.8 at 64)
_TMA_ROWS = 256   # a TMA box is at most 256 rows


def _block_bases(upto_te):
  """int32 [T / 64, E]: expert e's offset plus its picks in the blocks before b, minus one (an
  assignment's place is this plus its inclusive block prefix), and the group sizes int32 [E]."""
  counts_be = upto_te[BLOCK - 1::BLOCK].astype(jnp.int32)
  sizes_e = jnp.sum(counts_be, axis=0)
  base_be = (jnp.cumsum(counts_be, axis=0) - counts_be) + (jnp.cumsum(sizes_e) - sizes_e) - 1
  return base_be.astype(jnp.int32), sizes_e


def expert_order_reference(experts_tk, upto_te, stats_spe):
  """expert_order's contract in jnp (CPU, and T not a multiple of 64 * 64)."""
  num_tokens, num_experts = upto_te.shape
  top_k = experts_tk.shape[1]
  base_be, sizes_e = _block_bases(upto_te)
  slot_tk = jnp.arange(num_tokens, dtype=jnp.int32)[:, None] * num_experts + experts_tk
  block_tk = (jnp.arange(num_tokens, dtype=jnp.int32) // BLOCK)[:, None] * num_experts + experts_tk
  place_m = (jnp.take(upto_te.reshape(-1), slot_tk).astype(jnp.int32)
             + jnp.take(base_be.reshape(-1), block_tk)).reshape(-1)
  mean_prob_e, lse2_e = jnp.sum(stats_spe, axis=1) / num_tokens
  return (inverse_permutation(place_m), place_m, sizes_e, sizes_e / (num_tokens * top_k),
          mean_prob_e, jnp.sum(lse2_e))


def expert_order(experts_tk, upto_te, stats_spe):
  """(sort_idx int32 [T*k], place int32 [T*k], group sizes int32 [E], expert fractions f32 [E],
  mean probabilities f32 [E], z-loss f32 []).

  sort_idx is the flat assignments (t * k + j) in stable expert order and place its inverse.
  stats_spe [2, P, E] holds the fused kernel's per-CTA sums of the probabilities and of
  logsumexp^2 per row slot (the z-loss is the latter's total divided by T).

  CTA i places 512 tokens: the 8 blocks of its chunk (64 blocks) from row0 = 8 * (i % 8) on. It
  reads every block's counts C (the prefixes' last rows) through a TMA ring and accumulates one
  wgmma per 128 blocks, earlier @ C: rows 0-7 count the picks of the blocks before each of its
  blocks, row 63 (all ones) every pick, i.e. the group sizes. bf16 0/1 and counts <= 64 are
  exact, and so are the f32 sums (< 2^24). Then each thread takes 32 assignments: place = the
  expert's offset (an exclusive scan of the sizes) + the picks before its block + its prefix at
  its expert - 1, stored to sort_idx[place] by the thread itself (Hopper's TMA has no scatter).
  One kernel replaces block bases, a gather fusion, a scatter and a reduction (H100: 14 us, with
  the fused kernel 0.220-0.223 ms a route; 0.236 busy and 8 kernels before).
  """
  num_tokens, num_experts = upto_te.shape
  top_k = experts_tk.shape[1]
  num_blocks = num_tokens // BLOCK
  parts = stats_spe.shape[1]
  if num_blocks % BLOCK or num_experts != BLOCK or parts % BLOCK:
    return expert_order_reference(experts_tk, upto_te, stats_spe)
  pl, plgpu = _compat.mgpu()
  step_blocks = STEP_BLOCKS if num_blocks % STEP_BLOCKS == 0 else BLOCK   # K of a wgmma
  steps = num_blocks // step_blocks
  cta_blocks = CTA_TOKENS // BLOCK
  ring = min(steps, 8 * BLOCK // step_blocks)   # 64 KiB of counts in flight
  shape = (BLOCK, num_experts)
  wgmma = plgpu.Layout.WGMMA
  bf16_tf = _compat.swizzle_transforms(num_experts, jnp.bfloat16)
  f32_tf = _compat.swizzle_transforms(num_experts, jnp.float32)
  last_row = pl.ds((BLOCK - 1) * num_experts, num_experts)   # of a block in upto [B, 64 * E]
  boxes = CTA_TOKENS // _TMA_ROWS
  scatter = _scatter_places(top_k, cta_blocks)
  sum_z = _sum_last_row(num_experts)

  def order(upto_blocks, upto_gmem, experts_gmem, stats_gmem,
            sort_gmem, place_gmem, sizes_gmem, frac_gmem, prob_gmem, z_gmem):
    i = lax.axis_index("cta")
    chunk = i // (BLOCK // cta_blocks)
    row0 = lax.rem(i, BLOCK // cta_blocks) * cta_blocks

    @functools.partial(
        pl.run_scoped,
        c_ring=plgpu.SMEM((ring, step_blocks, num_experts), jnp.bfloat16, transforms=bf16_tf),
        loaded=plgpu.Barrier(num_arrivals=1, num_barriers=ring),
        counts_smem=plgpu.SMEM(shape, jnp.int32),
        upto_smem=plgpu.SMEM((CTA_TOKENS, num_experts), jnp.bfloat16),
        experts_smem=plgpu.SMEM((CTA_TOKENS, top_k), jnp.int32),
        mine=plgpu.Barrier(num_arrivals=1, num_barriers=2 * boxes),
        st_smem=plgpu.SMEM((parts, num_experts), jnp.float32, transforms=f32_tf),
        st_loaded=plgpu.Barrier(num_arrivals=1),
        sizes_smem=plgpu.SMEM((num_experts,), jnp.int32),
        sums_smem=plgpu.SMEM((2, num_experts), jnp.float32))
    def _scope(c_ring, loaded, counts_smem, upto_smem, experts_smem, mine, st_smem, st_loaded,
               sizes_smem, sums_smem):
      def load(c, slot):
        plgpu.copy_gmem_to_smem(upto_blocks.at[pl.ds(c * step_blocks, step_blocks), last_row],
                                c_ring.at[slot], loaded.at[slot])

      for c in range(ring):
        load(c, c)
      for b in range(boxes):   # this CTA's prefixes and picks, read while the counts accumulate
        rows = pl.ds(i * CTA_TOKENS + b * _TMA_ROWS, _TMA_ROWS)
        plgpu.copy_gmem_to_smem(upto_gmem.at[rows], upto_smem.at[pl.ds(b * _TMA_ROWS, _TMA_ROWS)],
                                mine.at[2 * b])
        plgpu.copy_gmem_to_smem(experts_gmem.at[rows],
                                experts_smem.at[pl.ds(b * _TMA_ROWS, _TMA_ROWS)],
                                mine.at[2 * b + 1])

      @pl.when(i < 2)   # CTA 0 sums the probabilities, CTA 1 the logsumexp^2
      def _load_stats():
        plgpu.copy_gmem_to_smem(stats_gmem.at[i], st_smem, st_loaded)

      row = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=wgmma)
      totals_row = row == BLOCK - 1
      a_shape = (BLOCK, step_blocks)
      a_row = plgpu.broadcasted_iota(jnp.int32, a_shape, 0, layout=wgmma)
      a_col = plgpu.broadcasted_iota(jnp.int32, a_shape, 1, layout=wgmma)

      def accumulate(acc_ref):
        @pl.loop(0, steps)
        def _steps(c):
          slot = lax.rem(c, ring)
          plgpu.barrier_wait(loaded.at[slot])
          own = a_row < cta_blocks
          before = a_col - a_row - row0 < chunk * BLOCK - c * step_blocks
          earlier = (own & before) | (a_row == BLOCK - 1)
          plgpu.wgmma(acc_ref, earlier.astype(jnp.bfloat16), c_ring.at[slot])
          plgpu.wgmma_wait(0)

          @pl.when(c + ring < steps)
          def _refill():
            load(c + ring, slot)

        return acc_ref[...]

      counts = pl.run_scoped(accumulate, plgpu.ACC(shape, jnp.float32))
      counts_smem[...] = counts.astype(jnp.int32)
      for b in range(2 * boxes):
        plgpu.barrier_wait(mine.at[b])
      scatter(experts_smem, upto_smem, counts_smem, sort_gmem, place_gmem)

      @pl.when(i < 2)
      def _totals():
        sizes = jnp.sum(jnp.where(totals_row, counts, 0.0), axis=0)
        plgpu.barrier_wait(st_loaded)
        total = plgpu.layout_cast(jnp.zeros(shape, jnp.float32), wgmma)
        for p in range(parts // BLOCK):
          total = total + plgpu.load(st_smem.at[pl.ds(p * BLOCK, BLOCK)], (), layout=wgmma)
        mean = jnp.sum(total, axis=0) * (1.0 / num_tokens)

        @pl.when(i == 0)
        def _probs():
          sums_smem[0] = sizes * (1.0 / (num_tokens * top_k))
          sums_smem[1] = mean
          sizes_smem[...] = sizes.astype(jnp.int32)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(sums_smem.at[0], frac_gmem)
          plgpu.copy_smem_to_gmem(sums_smem.at[1], prob_gmem)
          plgpu.copy_smem_to_gmem(sizes_smem, sizes_gmem)

        @pl.when(i == 1)
        def _z():
          sums_smem[1] = mean
          sum_z(sums_smem, z_gmem)

      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  slots = num_tokens * top_k
  kernel = _compat.mgpu_kernel(
      order, grid=(num_tokens // CTA_TOKENS,), grid_names=("cta",),
      out_type=(jax.ShapeDtypeStruct((slots,), jnp.int32),
                jax.ShapeDtypeStruct((num_tokens, top_k), jnp.int32),
                jax.ShapeDtypeStruct((num_experts,), jnp.int32),
                jax.ShapeDtypeStruct((num_experts,), jnp.float32),
                jax.ShapeDtypeStruct((num_experts,), jnp.float32),
                jax.ShapeDtypeStruct((1,), jnp.float32)),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  sort_idx, place, sizes, frac, mean_prob, z = kernel(
      upto_te.reshape(num_blocks, BLOCK * num_experts), upto_te, experts_tk, stats_spe)
  return sort_idx, place.reshape(-1), sizes, frac, mean_prob, z.reshape(())


def _scatter_places(top_k, cta_blocks):
  """Each thread's assignments: place = offset + count before + prefix - 1 (every load first, so
  they overlap), then sort_idx[place] = slot by the thread and place[slot] in vector stores.
  counts_ref rows: 0..cta_blocks-1 the picks before each of the CTA's blocks, the last row the
  group sizes; the row before it receives the experts' offsets."""
  _, plgpu = _compat.mgpu()
  ir, arith, memref, gpu, mgpu = _compat.mgpu_mlir()

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 5)
  def scatter(ctx, experts_ref, upto_ref, counts_ref, sort_ref, place_ref):
    del ctx
    index, i32, f32 = ir.IndexType.get(), ir.IntegerType.get_signless(32), ir.F32Type.get()
    c = lambda v: mgpu.utils.c(v, index)
    sizes_row = ir.MemRefType(counts_ref.type).shape[0] - 1
    mgpu.utils.warpgroup_barrier()   # counts_ref was written by the other threads
    # offsets[e] = sizes[0] + ... + sizes[e - 1] - 1, by thread e < E, into the spare row
    lane = arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x))
    num_experts = ir.MemRefType(counts_ref.type).shape[1]
    total = mgpu.utils.c(-1, i32)
    for e in range(num_experts - 1):
      size = memref.load(counts_ref, [c(sizes_row), c(e)])
      total = arith.addi(total, arith.select(
          arith.cmpi(arith.CmpIPredicate.slt, mgpu.utils.c(e, i32), lane), size,
          mgpu.utils.c(0, i32)))
    with mgpu.utils.when(arith.cmpi(arith.CmpIPredicate.slt, lane,
                                    mgpu.utils.c(num_experts, i32))):
      memref.store(total, counts_ref, [c(sizes_row - 1), arith.index_cast(index, lane)])
    mgpu.utils.warpgroup_barrier()

    cta = gpu.block_id(gpu.Dimension.x)
    token0 = arith.muli(cta, c(CTA_TOKENS))
    picks = mgpu.FragmentedArray.load_strided(experts_ref, is_signed=True)

    def place_of(expert, idx):
      token, _ = idx
      e = arith.index_cast(index, expert)
      prefix = arith.fptosi(i32, arith.extf(f32, memref.load(upto_ref, [token, e])))
      before = memref.load(counts_ref, [arith.divui(token, c(BLOCK)), e])
      return arith.addi(arith.addi(prefix, before),
                        memref.load(counts_ref, [c(sizes_row - 1), e]))

    places = picks.foreach(place_of, create_array=True, is_signed=True)

    def store(place, idx):
      token, j = idx
      slot = arith.addi(arith.muli(arith.addi(token0, token), c(top_k)), j)
      memref.store(arith.index_cast(i32, slot), sort_ref, [arith.index_cast(index, place)])

    places.foreach(store)
    places.store_untiled(mgpu.utils.memref_slice(place_ref, mgpu.utils.ds(token0, CTA_TOKENS)))

  return scatter


def _sum_last_row(num_experts):
  """z_ref[0] = sum of sums_ref's last row (every thread stores the same value)."""
  _, plgpu = _compat.mgpu()
  ir, arith, memref, _, mgpu = _compat.mgpu_mlir()

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 2)
  def sum_z(ctx, sums_ref, z_ref):
    del ctx
    mgpu.utils.warpgroup_barrier()   # the row was written by the other threads
    c = lambda v: mgpu.utils.c(v, ir.IndexType.get())
    last = c(ir.MemRefType(sums_ref.type).shape[0] - 1)
    total = memref.load(sums_ref, [last, c(0)])
    for e in range(1, num_experts):
      total = arith.addf(total, memref.load(sums_ref, [last, c(e)]))
    memref.store(total, z_ref, [c(0)])

  return sum_z

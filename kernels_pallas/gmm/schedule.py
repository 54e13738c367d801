"""Tile schedules for grouped matmul over rows sorted by group.

Every backend walks a static-length list of row tiles ("visits"); the group sizes are
traced, so the list is built in jnp and passed to the kernel as small int32 arrays, or (the
GPU gmm) derived inside the kernel from each group's first row and first visit.

Two layouts:
- group start: each group's tiles start at the group's first row, so only a group's last
  tile is partial (about G/2 wasted tiles); rows past sum(group_sizes) form a pseudo-group
  that is written with zeros. `group_start_schedule` as arrays (the jnp reference);
  `group_offsets` + `item_of` / `visit_of` (the GPU gmm, whose TMA copies take any row).
- `aligned_schedule`: tiles sit on multiples of tm and a tile shared by two groups is
  visited once per group (megablox); used where block indices must be tile-aligned (TPU).
"""
from typing import NamedTuple

import jax.numpy as jnp


class Schedule(NamedTuple):
  group_v: jnp.ndarray   # int32 [V]: group of the visit (G = the zero pseudo-group)
  start_v: jnp.ndarray   # int32 [V]: first output row the visit covers
  rows_v: jnp.ndarray    # int32 [V]: rows of the group inside the visit (0 = skip)
  lo_v: jnp.ndarray      # int32 [V]: first row of the group (for masking)
  hi_v: jnp.ndarray      # int32 [V]: one past the last row of the group


def cdiv(a, b):
  return (a + b - 1) // b


def group_bounds(group_sizes_e, m):
  """Row range [start, end) of each group, clipped to m rows."""
  sizes = group_sizes_e.astype(jnp.int32)
  ends = jnp.minimum(jnp.cumsum(sizes), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return starts, ends


def _expand(tiles_g, num_visits):
  """Visit v -> (group g, tile j within g) for a static number of visits."""
  ends = jnp.cumsum(tiles_g)
  v = jnp.arange(num_visits, dtype=jnp.int32)
  # compare_all: one fused [V, G] comparison. The default binary search is a while loop,
  # a handful of tiny kernels in front of every gmm (felt at batch-1 decode).
  g = jnp.searchsorted(ends, v, side="right", method="compare_all").astype(jnp.int32)
  g = jnp.minimum(g, tiles_g.shape[0] - 1)
  j = v - (ends[g] - tiles_g[g])
  valid = v < ends[-1]
  return g, j, valid


def group_start_schedule(group_sizes_e, m, tm, *, zero_tail=True) -> Schedule:
  """V = cdiv(m, tm) + G visits; group G covers rows [sum(sizes), m) with zeros.

  A visit writes rows [start_v, start_v + rows_v).
  """
  num_groups = group_sizes_e.shape[0]
  starts, ends = group_bounds(group_sizes_e, m)
  pad = (m - ends[-1]) if zero_tail else jnp.int32(0)
  starts = jnp.concatenate([starts, ends[-1:]])
  ends = jnp.concatenate([ends, ends[-1:] + pad])
  tiles_g = jnp.where(ends > starts, cdiv(ends - starts, tm), 0)
  g, j, valid = _expand(tiles_g, cdiv(m, tm) + num_groups)
  start_v = starts[g] + j * tm
  rows_v = jnp.where(valid, jnp.clip(ends[g] - start_v, 0, tm), 0)
  return Schedule(g, jnp.where(valid, start_v, 0), rows_v, starts[g], ends[g])


def aligned_schedule(group_sizes_e, m, tm, *, zero_tail=False, visit_empty=False) -> Schedule:
  """Visits on tile-aligned row blocks (start_v = block * tm), in group then block order.

  A block shared by two groups is visited once per group; the kernel masks rows to
  [lo_v, hi_v). zero_tail adds pseudo-group G over rows [sum(sizes), m) (gmm writes its
  zeros); visit_empty gives each empty group one visit (tgmm must write its zero dw).
  V = cdiv(m, tm) + G - 1 (+1 with zero_tail): adjacent groups share at most one block
  and an empty group's visit replaces the block it would have shared. Unused visits
  repeat the last group and block with an empty row range, so output blocks are only
  revisited consecutively and a pipelined kernel fetches nothing new for them.
  """
  num_groups = group_sizes_e.shape[0]
  tiles_m = cdiv(m, tm)
  starts, ends = group_bounds(group_sizes_e, m)
  if zero_tail:
    starts = jnp.concatenate([starts, ends[-1:]])
    ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
  first = jnp.minimum(starts // tm, tiles_m - 1)
  tiles_g = jnp.where(ends > starts, cdiv(ends, tm) - starts // tm, 1 if visit_empty else 0)
  g, j, valid = _expand(tiles_g, tiles_m + num_groups - 1 + int(zero_tail))
  block_v = first[g] + j
  last = jnp.max(jnp.where(valid, jnp.arange(valid.shape[0]), 0))
  lo_v = jnp.where(valid, starts[g], 0)
  hi_v = jnp.where(valid, ends[g], 0)
  start_v = jnp.where(valid, block_v, block_v[last]) * tm
  rows_v = jnp.clip(jnp.minimum(hi_v, start_v + tm) - jnp.maximum(lo_v, start_v), 0, tm)
  return Schedule(jnp.where(valid, g, g[last]), start_v, rows_v, lo_v, hi_v)


def group_offsets(group_sizes_e, m, tm):
  """int32 [2, G + 2]: per group, its first row (row 0) and its first visit (row 1; tiles of tm
  rows from the group's first row, so only its last tile is partial), for the G groups and the
  zero pseudo-group G over rows [sum(sizes), m); entry G + 1 closes the ranges.

  The GPU gmm's whole schedule: its kernel finds an item's visit and group from these 2G + 4
  numbers (`item_of`, `visit_of`). Building visit arrays in XLA took 9 small kernels, ~14 us
  in front of an A13B gmm (eighteenth session)."""
  starts, ends = group_bounds(group_sizes_e, m)
  rows = jnp.concatenate([starts, ends[-1:], jnp.full((1,), m, jnp.int32)])
  tiles = cdiv(rows[1:] - rows[:-1], tm)
  visits = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(tiles, dtype=jnp.int32)])
  return jnp.stack([rows, visits])


def _group_of(u, load, num_entries):
  """The group whose visits hold visit u: the last g with first visit <= u (binary search, so
  empty groups, whose first visit equals the next group's, are skipped)."""
  lo, hi = jnp.int32(0), jnp.int32(num_entries - 1)   # visits[lo] <= u < visits[hi]
  for _ in range(max(1, (num_entries - 1).bit_length())):
    mid = (lo + hi) // 2
    below = load(1, mid) <= u
    lo, hi = jnp.where(below, mid, lo), jnp.where(below, hi, mid)
  return lo


def _rows_of(v, g, load, tm):
  start = load(0, g) + (v - load(1, g)) * tm
  return start, jnp.minimum(load(0, g + 1) - start, tm)


def visit_of(v, load, num_entries, tm):
  """Visit v -> (group, first row, rows) from `group_offsets`; load(r, i) reads entry [r, i]."""
  g = _group_of(v, load, num_entries)
  return (g,) + _rows_of(v, g, load, tm)


def item_of(lin, load, num_entries, grid_n, width, tm):
  """Work item lin -> (N tile, group, first row, rows): the GPU gmm's item order.

  Windows of at most `width` visits of one group, counted from the group's first visit, in visit
  order; inside a window a snake over its visits for each N tile, so consecutive items (on
  neighbouring SMs) share a weight slice, which stays in L2. The N direction flips on every
  other window of a group, so a window starts on the slice its predecessor ended on.
  H100 (sixteenth and seventeenth sessions): windows that straddle two groups cost ~6%; the flip
  +0.3-0.6%; reordering whole groups or windows by size changed nothing (+-0.3%)."""
  u = lin // grid_n
  g = _group_of(u, load, num_entries)
  first = load(1, g)
  j = u - first                               # the visit's tile inside its group
  offset = j % width
  start = u - offset                          # the window's first visit and its length
  count = jnp.clip(load(1, g + 1) - first - (j - offset), 1, width)
  i = lin - start * grid_n
  ni, r = i // count, i % count
  visit = start + jnp.where(ni % 2 == 0, r, count - 1 - r)
  ni = jnp.where((j // width) % 2 == 1, grid_n - 1 - ni, ni)
  return (ni, g) + _rows_of(visit, g, load, tm)

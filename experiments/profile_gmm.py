"""Where a gmm / tgmm call spends its time, per work item, from Mosaic GPU's in-kernel profiler.

  PYTHONUNBUFFERED=1 python experiments/profile_gmm.py [--shapes a13b_up,a13b_down] [--forms fwd,dx,dw]

Each compute warpgroup records a "main" range (the pipeline: its fill and every K step) and
an "epilogue" range per work item (`Tiling.profile_space`); the split over the warpgroups'
busy spans tells the pipeline from the epilogue from the gaps between items. The profiler
stamps %clock, so durations are SM cycles (the trace files label them microseconds: read
kilocycles). The trace lives in shared memory: tgmm runs at 3 stages here (4 leave no room).
Traces go to $OUT/profile_gmm/<shape>_<form>/.
"""
import argparse
import collections
import dataclasses
import glob
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kernels_pallas.gmm import gpu  # noqa: E402
from bench_kernels import SHAPES, skewed_sizes  # noqa: E402

MMA_FLOP_PER_CYCLE = 4096   # H100 dense bf16 per SM: 989 TFLOP/s / (132 SMs x 1.83 GHz)


def split(trace_path):
  """Per-warpgroup ranges -> shares of the busy span, per-item medians (cycles), tail."""
  per = collections.defaultdict(list)
  for e in json.load(open(trace_path))["traceEvents"]:
    if e["name"] in ("main", "epilogue"):
      per[e["tid"]].append(e)
  total = collections.Counter()
  durs = collections.defaultdict(list)
  span = gap = 0.0
  ends = []
  for events in per.values():
    begin, first, last_end = {}, None, None
    for e in events:
      t = e["ts"] * 1e3   # back to cycles
      if e["ph"] == "B":
        begin[e["name"]] = t
        if e["name"] == "main":
          first = t if first is None else first
          gap += 0.0 if last_end is None else t - last_end
      else:
        d = t - begin.pop(e["name"])
        total[e["name"]] += d
        durs[e["name"]].append(d)
        last_end = t
    span += last_end - first
    ends.append(last_end)
  return dict(items=len(durs["main"]), warpgroups=len(per),
              main=total["main"] / span, epilogue=total["epilogue"] / span, between=gap / span,
              main_median=float(np.median(durs["main"])),
              epilogue_median=float(np.median(durs["epilogue"])),
              tail=(max(ends) - min(ends)) / (span / len(per)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default="a13b_up,a13b_down")
  ap.add_argument("--forms", default="fwd,dx,dw")
  args = ap.parse_args()
  out = os.path.join(os.environ.get("OUT", "/tmp"), "profile_gmm")
  rows = []
  for name in args.shapes.split(","):
    m, k, n, e = SHAPES[name]
    gs = jnp.asarray(skewed_sizes(m, e, seed=e + k))
    kx, kw, kd = jax.random.split(jax.random.key(k + n), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (e, k, n), jnp.bfloat16)
    dy = jax.random.normal(kd, (m, n), jnp.bfloat16)
    for form in args.forms.split(","):
      d = os.path.join(out, f"{name}_{form}")
      os.makedirs(d, exist_ok=True)
      if form == "dw":
        t = dataclasses.replace(gpu.TGMM_DEFAULT, stages=3, profile_space=900, profile_dir=d)
        f, a, steps = jax.jit(lambda x, dy, t=t: gpu.tgmm(x, dy, gs, tiling=t)), (x, dy), None
      else:
        t = dataclasses.replace(gpu.DEFAULT, profile_space=256, profile_dir=d)
        tr = form == "dx"
        f = jax.jit(lambda a, w, t=t, tr=tr: gpu.gmm(a, w, gs, transpose_rhs=tr, tiling=t))
        a, steps = (dy, w) if tr else (x, w), (n if tr else k) // t.tile_k
      jax.block_until_ready(f(*a))
      r = split(max(glob.glob(os.path.join(d, "*.json")), key=os.path.getmtime))
      if steps:   # the pipeline's cycles per K step against the tensor cores' (128 x 256 x 64)
        ideal = 2 * gpu.DEFAULT.tile_m * 2 * gpu.DEFAULT.tile_n * gpu.DEFAULT.tile_k
        r["main_vs_mma_peak"] = ideal / MMA_FLOP_PER_CYCLE * steps / r["main_median"]
      rows.append((name, form, r))
      print(name, form, json.dumps(r), flush=True)
  print("\n| shape | form | items | main | epilogue | between items | median item main / epilogue "
        "(kcycles) | main at MMA peak | tail |\n|---|---|---|---|---|---|---|---|---|")
  for name, form, r in rows:
    peak = f"{100 * r['main_vs_mma_peak']:.0f}%" if "main_vs_mma_peak" in r else "-"
    print(f"| {name} | {form} | {r['items']} | {100 * r['main']:.1f}% | {100 * r['epilogue']:.1f}% | "
          f"{100 * r['between']:.1f}% | {r['main_median'] / 1e3:.1f} / {r['epilogue_median'] / 1e3:.2f} | "
          f"{peak} | {100 * r['tail']:.1f}% |")


if __name__ == "__main__":
  main()

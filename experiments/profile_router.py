"""Where the fused router kernel spends its cycles, from Mosaic GPU's in-kernel profiler.

  PYTHONUNBUFFERED=1 python experiments/profile_router.py [--shapes a13b,a13b_sigmoid]

The MMA warpgroups record a "main" range per 64-token block (its K loop), the epilogue
warpgroup an "epilogue" range per block (`Tiling.profile_space`). Durations are SM cycles (the
trace files label them microseconds: read kilocycles). The trace lives in shared memory, so it
runs at one stage fewer than the default. Traces go to $OUT/profile_router/<shape>/.
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
from kernels_pallas.router import gpu  # noqa: E402
from kernels_pallas.router.split import split_bf16  # noqa: E402
from bench_kernels import ROUTER_SHAPES  # noqa: E402


def ranges(trace_path):
  """{scope: (count, median cycles, share of the warpgroups' spans)}, warpgroups, median span."""
  per = collections.defaultdict(list)
  for e in json.load(open(trace_path))["traceEvents"]:
    if e.get("ph") in ("B", "E"):
      per[e["tid"]].append(e)
  durs, spans = collections.defaultdict(list), []
  for events in per.values():
    begin, first, last = {}, None, None
    for e in events:
      t = e["ts"] * 1e3   # back to cycles
      first, last = (t if first is None else first), t
      if e["ph"] == "B":
        begin[e["name"]] = t
      else:
        durs[e["name"]].append(t - begin.pop(e["name"]))
    spans.append(last - first)
  total = sum(spans)
  return ({k: (len(v), float(np.median(v)), sum(v) / total) for k, v in durs.items()},
          len(per), float(np.median(spans)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default="a13b,a13b_sigmoid")
  args = ap.parse_args()
  for shape in args.shapes.split(","):
    t, d, e, spec, with_bias = ROUTER_SHAPES[shape]
    x = jax.random.normal(jax.random.key(3), (t, d), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(4), (d, e), jnp.float32) * d ** -0.5
    bias = jax.random.normal(jax.random.key(5), (e,), jnp.float32) * 0.01 if with_bias else None
    hi, lo = split_bf16(w)
    out = os.path.join(os.environ.get("OUT", "/tmp"), "profile_router", shape)
    os.makedirs(out, exist_ok=True)
    tiling = dataclasses.replace(gpu.DEFAULT, stages=gpu.DEFAULT.stages - 1, profile_space=160,
                                 profile_dir=out)
    jax.block_until_ready(jax.jit(
        lambda x: gpu.fused_router(x, hi, lo, bias, spec, tiling=tiling))(x))
    res, warpgroups, span = ranges(max(glob.glob(os.path.join(out, "*.json")),
                                       key=os.path.getmtime))
    print(f"\n{shape}: {warpgroups} warpgroups, median span {span / 1e3:.1f} kcycles")
    print("| scope | ranges | median (kcycles) | share of spans |\n|---|---|---|---|")
    for name, (n, med, share) in sorted(res.items(), key=lambda kv: -kv[1][2]):
      print(f"| {name} | {n} | {med / 1e3:.2f} | {100 * share:.1f}% |")


if __name__ == "__main__":
  main()

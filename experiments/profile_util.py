"""Where a jitted step spends its device time: top kernels from a jax.profiler trace.

The perfetto JSON the profiler writes (create_perfetto_trace=True) is plain Chrome-trace JSON, so
no profiler plugin is needed: events on the device's lines are summed by name.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile

import jax


def _device_lines(fn, *args, iters: int, trace_dir: str | None) -> dict:
  """{device line: [trace events]} of `iters` runs of fn(*args) (already compiled and warm)."""
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="trace_")
  jax.block_until_ready(fn(*args))
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
  files = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
  if not files:
    return {}
  with gzip.open(max(files, key=os.path.getmtime), "rt") as f:
    events = json.load(f)
  events = events.get("traceEvents", events) if isinstance(events, dict) else events
  proc, thread = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      proc[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      thread[(e["pid"], e["tid"])] = e["args"]["name"]
  lines = collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    pname = proc.get(e["pid"], "")
    if "GPU" not in pname and "TPU" not in pname and "device" not in pname.lower():
      continue
    lines[f"{pname} / {thread.get((e['pid'], e['tid']), e['tid'])}"].append(e)
  return lines


def top_kernels(fn, *args, iters: int = 3, top: int = 15, trace_dir: str | None = None) -> dict:
  """Runs fn(*args) (already compiled and warm) `iters` times under the profiler.

  Returns {line: [(kernel, ms per iteration, calls per iteration, share of the line)]} for the
  device lines (GPU streams / XLA ops) with the most busy time.
  """
  lines = {}
  for line, events in _device_lines(fn, *args, iters=iters, trace_dir=trace_dir).items():
    acc = lines[line] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
      acc[e["name"]][0] += e["dur"] / 1e3
      acc[e["name"]][1] += 1
  busiest = sorted(lines, key=lambda l: -sum(v[0] for v in lines[l].values()))[:2]
  out = {}
  for line in busiest:
    total = sum(v[0] for v in lines[line].values())
    rows = sorted(lines[line].items(), key=lambda kv: -kv[1][0])[:top]
    out[line] = [(name[:90], ms / iters, n / iters, ms / total) for name, (ms, n) in rows]
    out[line].append(("(total busy)", total / iters, sum(v[1] for v in lines[line].values()) / iters, 1.0))
  return out


def device_span_ms(fn, *args, iters: int = 5) -> float:
  """Device time of one fn(*args), in ms: from its first op's start to its last op's end on the
  busiest device line (gaps between its ops included, the host's time between programs not),
  the best of `iters` runs. What a program costs inside a longer one, e.g. a training step."""
  lines = _device_lines(fn, *args, iters=iters, trace_dir=None)
  if not lines:
    return float("nan")
  events = sorted(max(lines.values(), key=lambda ev: sum(e["dur"] for e in ev)),
                  key=lambda e: e["ts"])
  per = len(events) // iters
  spans = [(run[-1]["ts"] + run[-1]["dur"] - run[0]["ts"]) / 1e3
           for run in (events[i * per:(i + 1) * per] for i in range(iters))]
  return min(spans)


def print_top(title: str, table: dict) -> None:
  for line, rows in table.items():
    print(f"\n{title} - {line}")
    print("| kernel | ms/iter | calls/iter | share |\n|---|---|---|---|")
    for name, ms, n, share in rows:
      print(f"| {name} | {ms:.3f} | {n:.0f} | {100 * share:.0f}% |")

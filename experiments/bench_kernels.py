"""Benchmark kernels_pallas against its anchors, all in one run on one device.

  PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false python experiments/bench_kernels.py \
      [--only check,ceil,gmm,decode,swiglu,router] [--shapes a13b_up,...] [--variants] [--out DIR]

--variants also times gmm/tgmm tilings and the fused router's tilings and debug knobs.

Prints a short table last and writes every number to $OUT/bench_kernels.json (or --out).
TFLOP/s count the useful FLOPs 2*M*K*N (M = rows inside groups); the router's GB/s count
one read of x. Ceilings (copy bandwidth, dense matmul) are measured in the same run.
"""
import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import kernels_pallas as kp  # noqa: E402
from kernels_pallas.gmm import gpu as gmm_gpu  # noqa: E402
from profile_util import device_span_ms, print_top, top_kernels  # noqa: E402

SHAPES = {   # name: (M rows, K, N, experts)
    "a13b_up": (65536, 4096, 6144, 64),
    "a13b_down": (65536, 3072, 4096, 64),
    "hy3_up": (65536, 4096, 3072, 192),
    "hy3_down": (65536, 1536, 4096, 192),
}
DECODE = (256, 4096, 6144, 64)
ROWS, RESULTS = [], {}
WGM = gmm_gpu.Tiling(stages=3, wg_m=True)


def timeit(fn, *args, iters=10, batch=5):
  """Median over `iters` batches of `batch` back-to-back calls (async dispatch), in ms."""
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    for _ in range(batch):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / batch * 1e3)
  return statistics.median(times)


def timeit_rounds(fns, rounds=3, device_time=False):
  """{label: (fn, args)} -> {label: best ms}: every round times all, in a rotated (and every
  other round reversed) order. The H100's clock under sustained matmuls moves a single timing
  by 5-8%, and the kernel timed second used to look 1-4% faster (fourth session).

  device_time: the profiler's span of a call (profile_util.device_span_ms), what torch's CUDA
  events measure for its anchors. Wall time also carries the host's dispatch of each 5-call
  batch's first program (fourteenth session: ~0.4 ms on the host for a gmm program)."""
  def measure(fn, args):
    ms = device_span_ms(fn, *args, iters=5) if device_time else timeit(fn, *args, iters=5)
    if ms != ms:
      raise RuntimeError("the profiler saw no device ops")
    return ms

  labels, best = list(fns), {}
  for r in range(rounds):
    order = labels[r % len(labels):] + labels[:r % len(labels)]
    for label in (order[::-1] if r % 2 else order):
      if isinstance(best.get(label), str):   # failed in an earlier round
        continue
      try:
        best[label] = min(best.get(label, 1e30), measure(*fns[label]))
      except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        best[label] = f"FAIL {err}"[:300]
  return {label: best[label] for label in labels}


def row(section, name, ms, flops=None, nbytes=None, note=""):
  tf = flops / ms / 1e9 if flops else None
  gbs = nbytes / ms / 1e6 if nbytes else None
  ROWS.append((section, name, ms, tf, gbs, note))
  RESULTS.setdefault(section, {})[name] = dict(ms=ms, tflops=tf, gbs=gbs, note=note)
  print(f"  {section:10s} {name:28s} {ms:9.3f} ms"
        + (f" {tf:7.1f} TFLOP/s" if tf else "") + (f" {gbs:7.0f} GB/s" if gbs else "")
        + (f"  {note}" if note else ""), flush=True)


def skewed_sizes(m, e, seed, empty=0):
  """Multinomial over lognormal weights (max/mean about 3); `empty` groups get 0 rows."""
  rng = np.random.default_rng(seed)
  p = rng.lognormal(0.0, 0.75, e)
  p[rng.choice(e, empty, replace=False)] = 0
  return rng.multinomial(m, p / p.sum()).astype(np.int32)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def oracle_forms(x, w, dy, gs):
  """float64 host oracle for y = gmm(x, w), dx = gmm(dy, w^T), dw = tgmm(x, dy)."""
  x, w, dy = (np.asarray(a).astype(np.float64) for a in (x, w, dy))
  y, dx = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x)
  dw, s = np.zeros_like(w), 0
  for e, g in enumerate(np.asarray(gs)):
    rows = slice(s, s + int(g))
    y[rows], dx[rows], dw[e] = x[rows] @ w[e], dy[rows] @ w[e].T, x[rows].T @ dy[rows]
    s += int(g)
  return {"fwd": y, "dx": dx, "dw": dw}


def stage_check():
  """GPU kernels and the jnp reference, each against a float64 host oracle.

  Kernel vs reference alone is not enough: at 256x4096x512 the dx form came out
  bit-identical to the reference (rel err exactly 0.0, both bf16 wgmma with the same
  k order), which cannot tell a right answer from a shared wrong one. Each row
  reports both errors vs float64, whether the two outputs are identical, and the
  kernel output's norm (0 would mean nothing was written).
  """
  for (m, k, n, e, pad) in [(4096, 512, 1024, 8, 300), (1000, 256, 512, 16, 0),
                            (256, 4096, 512, 64, 0), (256, 4096, 512, 64, 40)]:
    key = jax.random.key(m + k + pad)
    kx, kw, kd = jax.random.split(key, 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (e, k, n), jnp.bfloat16)
    dy = jax.random.normal(kd, (m, n), jnp.bfloat16)
    gs = jnp.asarray(skewed_sizes(m - pad, e, m, empty=2))
    want = oracle_forms(x, w, dy, gs)
    res = {}
    for name, f in [("fwd", lambda b: kp.gmm(x, w, gs, backend=b)),
                    ("dx", lambda b: kp.gmm(dy, w, gs, transpose_rhs=True, backend=b)),
                    ("dw", lambda b: kp.tgmm(x, dy, gs, backend=b)),
                    ("fwd_wg_m", lambda b: gmm_gpu.gmm(x, w, gs, tiling=WGM) if b == "gpu"
                     else kp.gmm(x, w, gs, backend=b)),
                    ("dx_wg_m", lambda b: gmm_gpu.gmm(dy, w, gs, transpose_rhs=True, tiling=WGM)
                     if b == "gpu" else kp.gmm(dy, w, gs, transpose_rhs=True, backend=b))]:
      try:
        got = np.asarray(jax.jit(lambda: f("gpu"))(), np.float32)
        ref = np.asarray(jax.jit(lambda: f("reference"))(), np.float32)
        oracle = want[name.split("_")[0]]
        res[name] = dict(err=rel_err(got, oracle), err_reference=rel_err(ref, oracle),
                         identical_to_reference=bool(np.array_equal(got, ref)),
                         norm=float(np.linalg.norm(got)))
        if not name.startswith("dw") and pad:
          res[name]["pad_zero"] = bool(not np.any(got[m - pad:]))
      except Exception as err:  # noqa: BLE001 - report and go on
        traceback.print_exc()
        res[name] = f"FAIL {type(err).__name__}: {str(err)[:200]}"
    RESULTS.setdefault("check", {})[f"{m}x{k}x{n}_e{e}_pad{pad}"] = res
    print(f"  check {m}x{k}x{n} e={e} pad={pad}: {res}", flush=True)


def stage_ceilings():
  a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
  mm = jax.jit(lambda a, b: a @ b)
  row("ceiling", "dense bf16 8192^3", timeit(mm, a, b), flops=2 * 8192**3)
  row("ceiling", "dense bf16 8192^3, device time", device_span_ms(mm, a, b), flops=2 * 8192**3)
  big = jax.random.normal(jax.random.key(2), (1 << 30,), jnp.bfloat16)   # 2 GiB
  copy = jax.jit(lambda v: v * 2)
  row("ceiling", "copy 2 GiB (read+write)", timeit(copy, big), nbytes=2 * big.nbytes)
  row("ceiling", "copy 2 GiB, device time", device_span_ms(copy, big), nbytes=2 * big.nbytes)
  del big


def ours(x, w, dy, gs, tiling=None):
  fwd = jax.jit(lambda x, w: kp.gmm(x, w, gs, backend="gpu") if tiling is None
                else gmm_gpu.gmm(x, w, gs, tiling=tiling))
  dx = jax.jit(lambda dy, w: kp.gmm(dy, w, gs, transpose_rhs=True, backend="gpu"))
  dw = jax.jit(lambda x, dy: kp.tgmm(x, dy, gs, backend="gpu"))
  return fwd, dx, dw


def stage_gmm(names, variants):
  for name in names:
    m, k, n, e = SHAPES[name]
    sizes = skewed_sizes(m, e, seed=e + k)
    gs = jnp.asarray(sizes)
    kx, kw, kd = jax.random.split(jax.random.key(k + n), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (e, k, n), jnp.bfloat16)
    dy = jax.random.normal(kd, (m, n), jnp.bfloat16)
    flops = 2 * m * k * n
    sec = f"{name}"
    print(f"{name}: M={m} K={k} N={n} E={e} sizes min/max {sizes.min()}/{sizes.max()}", flush=True)
    fwd, dx, dw = ours(x, w, dy, gs)
    dense = jax.jit(lambda a, b: a @ b)
    fns = {"ours fwd": (fwd, (x, w)), "ours dx": (dx, (dy, w)), "ours dw": (dw, (x, dy)),
           "dense same FLOPs": (dense, (x, w[0]))}
    for device_time, suffix in ((False, ""), (True, ", device time")):
      for label, ms in timeit_rounds(fns, device_time=device_time).items():
        if isinstance(ms, str):
          RESULTS.setdefault(sec, {})[label + suffix] = ms
        else:
          row(sec, label + suffix, ms, flops=flops, note="best of 3 alternating rounds")
    if variants:
      T = gmm_gpu.Tiling
      for t in [T(stages=3, grid_minor=0, grid_width=16), T(stages=3, grid_minor=0, grid_width=4),
                T(stages=3, grid_minor=0, grid_width=8, wg_m=True),
                T(stages=3, grid_minor=0, grid_width=8, steady=True)]:
        try:
          f = ours(x, w, dy, gs, tiling=t)[0]
          row(sec, f"ours fwd {_short(t)}", timeit(f, x, w, iters=5), flops=flops)
        except Exception as err:  # noqa: BLE001
          print(f"  variant {t} failed: {str(err)[:300]}", flush=True)
      tg = functools.partial(dataclasses.replace, gmm_gpu.TGMM_DEFAULT)
      for t in [tg(grid_minor=0, grid_width=8), tg(grid_minor=1, grid_width=8),
                tg(grid_minor=0, grid_width=4), tg(delay_release=1)]:
        try:
          f = jax.jit(lambda x, dy, t=t: gmm_gpu.tgmm(x, dy, gs, tiling=t))
          row(sec, f"ours dw {_short(t)}", timeit(f, x, dy, iters=5), flops=flops)
          err = _rel_err(f(x, dy), dw(x, dy))
          print(f"  dw variant {_short(t)}: rel err vs default {err:.2e}", flush=True)
        except Exception as err:  # noqa: BLE001
          print(f"  variant {t} failed: {str(err)[:300]}", flush=True)
    _anchor_mgpu(sec, x, w, gs, flops)
    _anchor_torch(sec, m, k, n, e, sizes, flops)
    if name.startswith("a13b"):
      try:
        f = jax.jit(lambda x, w: jax.lax.ragged_dot(x, w, gs))
        row(sec, "jax.lax.ragged_dot", timeit(f, x, w, iters=2, batch=1), flops=flops)
      except Exception as err:  # noqa: BLE001
        RESULTS.setdefault(sec, {})["jax.lax.ragged_dot"] = f"FAIL {err}"[:300]
    del x, w, dy


def _rel_err(a, b):
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def _short(t):
  d = dataclasses.asdict(t)
  base = dataclasses.asdict(gmm_gpu.Tiling())
  return ",".join(f"{k}={v}" for k, v in d.items() if base[k] != v)


def _anchor_mgpu(sec, x, w, gs, flops):
  try:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    f = jax.jit(lambda x, w: ragged_dot_mgpu.ragged_dot(
        x, w, group_sizes=gs, block_m=128, block_n=128, block_k=64,
        max_concurrent_steps=4, grid_block_n=1))
    row(sec, "jax ragged_dot_mgpu", timeit(f, x, w), flops=flops, note="bm=bn=128 bk=64 s=4")
  except Exception as err:  # noqa: BLE001
    RESULTS.setdefault(sec, {})["jax ragged_dot_mgpu"] = f"FAIL {err}"[:300]
    print(f"  ragged_dot_mgpu failed: {str(err)[:200]}", flush=True)


def _anchor_torch(sec, m, k, n, e, sizes, flops):
  try:
    import torch
    if not hasattr(torch, "_grouped_mm"):
      return
    xt = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wt = torch.randn(e, k, n, device="cuda", dtype=torch.bfloat16).transpose(-2, -1)
    wt = wt.contiguous().transpose(-2, -1)   # column-major per expert, as CUTLASS wants
    for label, sz in [("torch._grouped_mm", sizes),
                      ("torch._grouped_mm equal", np.full(e, m // e, np.int32))]:
      offs = torch.tensor(np.cumsum(sz), device="cuda", dtype=torch.int32)
      try:
        ms = _torch_time(lambda: torch._grouped_mm(xt, wt, offs=offs))
        row(sec, label, ms, flops=flops)
      except Exception as err:  # noqa: BLE001
        RESULTS.setdefault(sec, {})[label] = f"FAIL {err}"[:300]
        print(f"  {label} failed: {str(err)[:200]}", flush=True)
    del xt, wt
    torch.cuda.empty_cache()
  except ImportError:
    pass


def _torch_time(fn, iters=10, batch=5):
  import torch
  fn()
  torch.cuda.synchronize()
  times = []
  for _ in range(iters):
    s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(batch):
      fn()
    t.record()
    torch.cuda.synchronize()
    times.append(s.elapsed_time(t) / batch)
  return statistics.median(times)


def stage_decode():
  m, k, n, e = DECODE
  sizes = skewed_sizes(m, e, seed=1)
  gs = jnp.asarray(sizes)
  kx, kw = jax.random.split(jax.random.key(9))
  x = jax.random.normal(kx, (m, k), jnp.bfloat16)
  w = jax.random.normal(kw, (e, k, n), jnp.bfloat16)
  wbytes = int(np.sum(sizes > 0)) * k * n * 2
  sec = "decode"
  for label, f in [("ours fwd", lambda x, w: kp.gmm(x, w, gs, backend="gpu")),
                   ("jax.lax.ragged_dot", lambda x, w: jax.lax.ragged_dot(x, w, gs))]:
    try:
      row(sec, label, timeit(jax.jit(f), x, w), nbytes=wbytes, note="GB/s = weight bytes")
    except Exception as err:  # noqa: BLE001
      traceback.print_exc()
      RESULTS.setdefault(sec, {})[label] = f"FAIL {err}"[:300]
  _anchor_mgpu(sec, x, w, gs, 2 * m * k * n)
  RESULTS[sec]["weight_bytes"] = wbytes


ROUTER_SHAPES = {   # name: (T, D, E, spec, with selection bias)
    "a13b": (65536, 4096, 64, kp.RouterSpec(top_k=8), False),
    "a13b_sigmoid": (65536, 4096, 64, kp.RouterSpec(top_k=8, scoring="sigmoid", scale=2.826,
                                                    eps=1e-20), True),   # Hy3's rule at E = 64
    "hy3": (65536, 4096, 192, kp.RouterSpec(top_k=8, scoring="sigmoid", scale=2.826,
                                            eps=1e-20), True),
}


def _check_order(r, num_experts):
  """The sort order is a permutation, expert-major and stable (slot ids ascending per expert)."""
  sort_idx = np.asarray(r.sort_idx_m)
  experts = np.asarray(r.experts_tk).reshape(-1)
  ok = np.array_equal(np.sort(sort_idx), np.arange(sort_idx.size))
  keys = experts[sort_idx].astype(np.int64) * sort_idx.size + sort_idx
  ok &= bool(np.all(np.diff(keys) > 0))
  ok &= np.array_equal(np.asarray(r.group_sizes_e), np.bincount(experts, minlength=num_experts))
  return bool(ok)


def router_variants(x, w, bias, spec, label):
  """The fused kernel alone under other tilings and with parts switched off (DEBUG knobs: their
  output is wrong, their time says what that part costs); two rounds in alternating order."""
  from kernels_pallas.router import gpu as router_gpu
  from kernels_pallas.router.split import split_bf16
  base = router_gpu.DEFAULT
  tilings = {"default": base, "1 stage fewer": dataclasses.replace(base, stages=base.stages - 1),
             "no lo product": dataclasses.replace(base, lo_product=False),
             "no top-k epilogue": dataclasses.replace(base, skip_select=True)}
  tilings["1 stage more"] = dataclasses.replace(base, stages=base.stages + 1)
  w_hi, w_lo = split_bf16(w)
  fns = {name: jax.jit(lambda x, t=t: router_gpu.fused_router(x, w_hi, w_lo, bias, spec, tiling=t))
         for name, t in tilings.items()}
  times = {}
  for rep in range(2):
    for name in (list(fns) if rep == 0 else list(fns)[::-1]):
      times.setdefault(name, []).append(timeit(fns[name], x, iters=10))
  for name, ts in times.items():
    row("router", f"{label} kernel, {name}", min(ts), nbytes=x.nbytes,
        note="rounds " + "/".join(f"{v:.3f}" for v in ts))


def stage_swiglu():
  """The gate+up gmm with SwiGLU in its epilogue against gmm + the XLA SwiGLU (A13B up weights;
  M = 65536 training / prefill rows down to 1024, a batch-128 decode step), device time."""
  from kernels_pallas.gmm import reference
  k, n, e = SHAPES["a13b_up"][1:]
  kw = jax.random.key(7)
  w = (jax.random.normal(kw, (e, k, n), jnp.bfloat16) * 0.02).astype(jnp.bfloat16)
  for m in (65536, 16384, 1024):
    gs = jnp.asarray(skewed_sizes(m, e, seed=e + k))
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
    fused = jax.jit(lambda x, w: kp.gmm_swiglu(x, w, gs, backend="gpu"))
    unfused = jax.jit(lambda x, w: reference.swiglu_halves(
        kp.gmm(x, w, gs, backend="gpu")).astype(jnp.bfloat16))
    err = rel_err(fused(x, w), unfused(x, w))
    best = timeit_rounds({"fused": (fused, (x, w)), "unfused": (unfused, (x, w))},
                         device_time=True)
    for label, ms in best.items():
      if not isinstance(ms, str):
        row(f"swiglu M={m}", f"gmm_swiglu {label}, device time", ms, flops=2 * m * k * n,
            note=f"rel err fused vs unfused {err:.1e}")


def stage_router(profile=False, shapes=("a13b", "a13b_sigmoid", "hy3"), variants=False):
  from kernels_pallas.router import gpu as router_gpu
  from kernels_pallas.router.split import logits_fp32, split_bf16
  for shape in shapes:
    t, d, e, spec, with_bias = ROUTER_SHAPES[shape]
    x = jax.random.normal(jax.random.key(3), (t, d), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(4), (d, e), jnp.float32) * d ** -0.5
    bias = jax.random.normal(jax.random.key(5), (e,), jnp.float32) * 0.01 if with_bias else None
    fused = router_gpu.select_tiling(t, d, e, spec.top_k, x.dtype) is not None
    fns = {b: jax.jit(lambda x, w, b=b: kp.route(x, w, bias, spec, backend=b))
           for b in ("reference", "split") + (("gpu",) if fused else ())}
    if fused:
      fns["gpu kernel alone"] = jax.jit(
          lambda x, w: router_gpu.fused_router(x, *split_bf16(w), bias, spec))
      fns["gpu kernel writing logits"] = jax.jit(   # the forward under a gradient
          lambda x, w: router_gpu.fused_router(x, *split_bf16(w), bias, spec, with_logits=True))
    out, times = {}, {}
    for name, f in fns.items():
      try:
        out[name] = f(x, w)
        jax.block_until_ready(out[name])
      except Exception as err:  # noqa: BLE001 - report, keep the other rows
        traceback.print_exc()
        RESULTS.setdefault("router", {})[f"{shape} {name}"] = f"FAIL {err}"[:300]
    for rep in range(2):   # two rounds, reversed order in the second (order-of-timing bias)
      for name in (list(out) if rep == 0 else list(out)[::-1]):
        times.setdefault(name, []).append(timeit(fns[name], x, w, iters=20))
    for name in out:
      row("router", f"{shape} {name}", min(times[name]), nbytes=x.nbytes,
          note="rounds " + "/".join(f"{v:.3f}" for v in times[name]))
      if profile and not name.startswith("gpu kernel"):
        print_top(f"{shape} route {name}", top_kernels(fns[name], x, w, iters=5, top=20))
    if "gpu" in out:   # four routers in one program, as in a model step: no per-program launch
      xs = jnp.stack([jnp.roll(x, i, axis=0) for i in range(4)])
      four = jax.jit(lambda xs, w: [kp.route(xs[i], w, bias, spec, backend="gpu")
                                    for i in range(4)])
      ms = min(timeit(four, xs, w, iters=20) for _ in range(2)) / 4
      row("router", f"{shape} gpu, per call of 4 in one program", ms, nbytes=x.nbytes)
      # the route's own device time inside a longer program (the host's per-program dispatch,
      # ~0.1 ms here, is paid once per training step, not per router)
      ms = device_span_ms(four, xs, w) / 4
      row("router", f"{shape} gpu, device time per call", ms, nbytes=x.nbytes)
      copy = RESULTS.get("ceiling", {}).get("copy 2 GiB, device time")
      if copy and copy.get("gbs"):
        print(f"  router {shape} gpu: {100 * x.nbytes / ms / 1e6 / copy['gbs']:.1f}% of the copy's "
              "device bandwidth", flush=True)
      del xs
    if variants and fused:
      router_variants(x, w, bias, spec, shape)
    res = RESULTS.setdefault("router", {})
    xs = np.asarray(x[:512], np.float64) @ np.asarray(w, np.float64)
    lg = {"split": logits_fp32(x[:512], w)}
    if "gpu kernel writing logits" in out:
      lg["gpu"] = out["gpu kernel writing logits"].logits_te[:512]
    for name, v in lg.items():
      res[f"{shape} logits_rel_err_{name}_vs_f64"] = rel_err(v, xs)
      print(f"  router {shape} logits {name} vs float64: rel err {rel_err(v, xs):.2e}", flush=True)
    ref = out["reference"]
    for name in ("split", "gpu"):
      if name not in out:
        continue
      r = out[name]
      same = float(np.mean(np.asarray(r.experts_tk) == np.asarray(ref.experts_tk)))
      werr = rel_err(r.weights_tk, ref.weights_tk)
      res[f"{shape} {name} experts_agree"], res[f"{shape} {name} weights_rel_err"] = same, werr
      res[f"{shape} {name} order_ok"] = _check_order(r, e)
      print(f"  router {shape} {name} vs reference: experts agree {same:.6f}, weights rel err "
            f"{werr:.2e}, order valid+stable {res[f'{shape} {name} order_ok']}", flush=True)
    if "gpu" in out:   # gradients of a weighted loss through the fused kernel vs split
      probe = jax.random.normal(jax.random.key(6), (t, spec.top_k), jnp.float32)
      grads = {}
      for b in ("split", "gpu"):
        loss = lambda x, w, b=b: jnp.sum(kp.route(x, w, bias, spec, backend=b).weights_tk * probe)
        grads[b] = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
      for i, nm in enumerate(("dx", "dw")):
        res[f"{shape} grad_{nm}_rel_err_gpu_vs_split"] = rel_err(grads["gpu"][i], grads["split"][i])
        print(f"  router {shape} {nm} gpu vs split: rel err "
              f"{res[f'{shape} grad_{nm}_rel_err_gpu_vs_split']:.2e}", flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--only", default="check,ceil,gmm,decode,swiglu,router")
  ap.add_argument("--shapes", default=",".join(SHAPES))
  ap.add_argument("--variants", action="store_true")
  ap.add_argument("--profile", action="store_true", help="top device kernels of the router")
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  args = ap.parse_args()
  stages = args.only.split(",")
  os.makedirs(args.out, exist_ok=True)
  dev = jax.devices()[0]
  RESULTS["env"] = dict(device=str(dev.device_kind), jax=jax.__version__,
                        sms=getattr(dev, "core_count", None), argv=sys.argv)
  print(f"device {dev.device_kind}, jax {jax.__version__}, SMs {RESULTS['env']['sms']}")
  for st, fn in [("check", stage_check), ("ceil", stage_ceilings),
                 ("gmm", lambda: stage_gmm(args.shapes.split(","), args.variants)),
                 ("decode", stage_decode), ("swiglu", stage_swiglu), ("router", lambda: stage_router(args.profile, variants=args.variants))]:
    if st in stages:
      try:
        fn()
      except Exception:  # noqa: BLE001 - one stage failing must not lose the others
        traceback.print_exc()
      with open(os.path.join(args.out, "bench_kernels.json"), "w") as fh:
        json.dump(RESULTS, fh, indent=1, default=str)
  print("\n| section | impl | ms | TFLOP/s | GB/s | note |\n|---|---|---|---|---|---|")
  for sec, name, ms, tf, gbs, note in ROWS:
    print(f"| {sec} | {name} | {ms:.3f} | {tf or 0:.1f} | {gbs or 0:.0f} | {note} |")


if __name__ == "__main__":
  main()

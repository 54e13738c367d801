"""Training throughput and MFU of an A13B-width MoE on one GPU (shared/BENCHMARKS.md).

Model: hidden 4096, 32/8 heads x 128, 64 experts x 3072 top-8 + a 3072 shared expert, A13B vocab,
seq 4096, as many layers as fit with the optimizer state (`--layers=0`: the most that the
compiler's memory analysis says fit). bf16 compute; params and Adam moments in `--state_dtype`
(bf16 by default: fp32 master weights + fp32 Adam need 16 B/param, so a 2.5 B-param layer of
this width would leave room for one layer only). Variants: `--impls` (the kernels' dispatch
`auto`, or `reference` for the jnp ops) x `--microbatches` (gradient accumulation: the optimizer
update, timed alone too, is paid once per step). `--profile` prints the step's top GPU kernels.

MFU = 6 x active params x tokens + causal attention FLOPs, over step time x peak, with peak =
the dense bf16 matmul rate measured in this run, and the 989 TFLOP/s H100 datasheet.
A per-part breakdown (routed MoE FFN, attention block, lm_head + loss; fwd + bwd) says which
part limits. Writes bench_train.json to --out (default $OUT) and prints a table last.

    python experiments/bench_train.py --layers=2 --steps=3 --microbatches=1,8,16 [--profile]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hunyuan_jax.xla_flags import use_train_xla_flags  # noqa: E402

use_train_xla_flags()   # as `python -m hunyuan_jax.train` does

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hunyuan_jax.config import ModelConfig
from hunyuan_jax.model import abstract_params
from hunyuan_jax.sharding import make_mesh
from hunyuan_jax.train.metrics import active_matmul_params, datasheet_tflops, flops_per_token
from hunyuan_jax.train.optimizer import make_optimizer
from hunyuan_jax.train.run_config import MoETrainConfig, OptimConfig
from hunyuan_jax.train.step import abstract_state, fresh_state, jit_train_step, state_shardings
from profile_util import print_top, top_kernels

KEYS = ("inputs", "targets", "positions", "loss_mask")   # no segment ids: cuDNN causal attention


SMOKE = {}   # --smoke: small dims to check the script on CPU


def model_config(layers: int, impl: str, state_dtype: str, remat: str) -> ModelConfig:
  base = ModelConfig.from_pretrained("a13b").replace(**SMOKE)
  n, f = layers, SMOKE.get("intermediate_size", 3072)
  return base.replace(num_layers=n, mlp_layer_types=("moe",) * n, moe_top_k=(8,) * n,
                      moe_intermediate_size=(f,) * n, shared_expert_size=(f,) * n,
                      dtype="bfloat16", param_dtype=state_dtype, remat_policy=remat,
                      attention_impl="cudnn" if jax.default_backend() == "gpu" else "xla",
                      moe_impl=impl)


def timed(fn, *args, iters=10):
  out = fn(*args)
  jax.block_until_ready(out)
  t = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / iters


def matmul_peak_tflops(n: int = 8192) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  dt = timed(jax.jit(lambda a, b: a @ b), a, b, iters=20)
  return 2 * n ** 3 / dt / 1e12


def build(cfg, seq, batch, mu_dtype, micro):
  mesh = make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
  optim = OptimConfig(lr=1e-4, warmup_steps=10, mu_dtype=mu_dtype)
  tx, lr_fn = make_optimizer(optim, cfg, abstract_params(cfg), 1000)
  abstract = abstract_state(cfg, tx)
  sh = state_shardings(abstract, cfg, mesh)
  step = jit_train_step(cfg, MoETrainConfig(), tx, lr_fn, micro, mesh, sh, batch_keys=KEYS)
  a_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)
  a_batch = {k: jax.ShapeDtypeStruct((batch * micro, seq), jnp.float32 if k == "loss_mask" else jnp.int32)
             for k in KEYS}
  t = time.perf_counter()
  compiled = step.lower(a_state, a_batch).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  need = None
  if mem is not None:
    need = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
  return compiled, tx, sh, need, compile_s


_BUILT: dict = {}


def build_cached(layers, impl, micro, args):
  key = (layers, impl, micro)
  if key not in _BUILT:
    _BUILT.clear()   # one compiled program at a time
    cfg = model_config(layers, impl, args.state_dtype, args.remat)
    _BUILT[key] = (cfg,) + build(cfg, args.seq, args.batch, args.state_dtype, micro)
  return _BUILT[key]


def run_variant(layers, impl, micro, args, peak_meas, peak_sheet, hbm):
  cfg, compiled, tx, sh, need, compile_s = build_cached(layers, impl, micro, args)
  if args.dump_hlo:   # the optimized HLO, to read what a profiled fusion computes
    with open(os.path.join(args.out, f"train_step_{impl}_x{micro}.hlo.txt"), "w") as f:
      f.write(compiled.as_text())
  print(f"[{impl} x{micro}] layers {layers}: compiled in {compile_s:.0f} s, needs "
        f"{need / 2**30 if need else float('nan'):.1f} GiB of {hbm / 2**30:.1f}", flush=True)
  state = jax.jit(lambda r: fresh_state(cfg, tx, r), out_shardings=sh)(jax.random.key(0))
  rng = np.random.default_rng(0)
  rows = args.batch * micro
  tokens = rng.integers(0, cfg.vocab_size, (rows, args.seq + 1), dtype=np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (rows, args.seq)),
           "loss_mask": np.ones((rows, args.seq), np.float32)}
  batch = jax.device_put(batch)
  steps = args.steps if impl == "auto" else args.ref_steps
  for _ in range(2):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, batch)
  loss = float(m["loss"])
  dt = (time.perf_counter() - t) / steps
  if args.profile:
    def one_step():
      nonlocal state
      state, m = compiled(state, batch)
      return m
    print_top(f"train step, {impl}, {layers} layers, {micro} microbatches", top_kernels(one_step, iters=2, top=args.profile_top))
  tokens_step = rows * args.seq
  flops = flops_per_token(cfg, args.seq) * tokens_step
  opt_s = None
  if micro == 1 and impl == "auto":   # the optimizer update alone: paid once per step
    def update(state, grads):
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      return {**state, "params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, p.dtype), state["params"])
    upd = jax.jit(update, donate_argnums=0)
    state = upd(state, grads)
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(3):
      state = upd(state, grads)
    jax.block_until_ready(state)
    opt_s = (time.perf_counter() - t) / 3
    del grads
  del state
  return {"impl": impl, "microbatches": micro, "layers": layers, "step_s": dt,
          "optimizer_update_s": opt_s, "tokens_per_s": tokens_step / dt,
          "model_tflops_per_step": flops / 1e12, "achieved_tflops": flops / dt / 1e12,
          "mfu_measured_peak": flops / dt / (peak_meas * 1e12),  # noqa: E501
          "mfu_datasheet": flops / dt / (peak_sheet * 1e12) if peak_sheet else None,
          "compile_s": compile_s, "memory_gib": need / 2**30 if need else None, "loss": loss,
          "active_params": active_matmul_params(cfg)}


def breakdown(args, peak_meas):
  """fwd+bwd time of the parts of one layer (+ the head) at the benchmark's token count."""
  import kernels_pallas as kp
  from hunyuan_jax.model.attention import flash_attention
  from hunyuan_jax.model.layers import einsum_f32, swiglu
  from hunyuan_jax.model.moe import moe_ffn, router_spec
  from hunyuan_jax.train.cross_entropy import linear_cross_entropy
  cfg = model_config(1, "auto", "bfloat16", "none")
  t, d, e, f = args.batch * args.seq, cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size[0]
  n, kv, hd, vocab = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
  ks = jax.random.split(jax.random.key(1), 8)
  bf = jnp.bfloat16
  x = jax.random.normal(ks[0], (t, d), bf)
  out = {}

  def moe_loss(x, wr, wi, wo):
    y, _ = moe_ffn(x, wr, None, wi, wo, cfg=cfg, top_k=8, dtype=bf)
    return jnp.sum(y.astype(jnp.float32) ** 2)
  wr = jax.random.normal(ks[1], (d, e), bf) * 0.02
  wi = jax.random.normal(ks[2], (e, d, 2, f), bf) * 0.02
  wo = jax.random.normal(ks[3], (e, f, d), bf) * 0.02
  for impl in ("auto", "reference"):
    cfg = dataclasses.replace(cfg, moe_impl=impl)
    dt = timed(jax.jit(jax.grad(moe_loss, argnums=(0, 2, 3))), x, wr, wi, wo, iters=3)
    fl = 6 * t * 8 * 3 * d * f
    out[f"routed_moe_{impl}"] = {"ms": dt * 1e3, "tflops": fl / dt / 1e12}

  # The routed MoE's pieces (fwd + bwd): the router alone, and the two gmms + SwiGLU alone on
  # rows already sorted by expert; routed_moe_auto minus both = dispatch, combine and glue.
  cfg = dataclasses.replace(cfg, moe_impl="auto")
  def route_loss(x, wr):
    r = kp.route(x, wr, None, router_spec(cfg, 8))
    return jnp.sum(r.weights_tk ** 2)
  dt = timed(jax.jit(jax.grad(route_loss, argnums=(0, 1))), x, wr, iters=3)
  out["moe_router"] = {"ms": dt * 1e3, "tflops": 6 * t * d * e / dt / 1e12}
  gs = jnp.asarray(np.random.default_rng(0).multinomial(t * 8, np.ones(e) / e), jnp.int32)
  xs = jax.random.normal(ks[4], (t * 8, d), bf)
  def experts_loss(xs, wi, wo):
    h = kp.gmm(xs, wi.reshape(e, d, 2 * f), gs)
    y = kp.gmm(swiglu(h.reshape(-1, 2, f)), wo, gs)
    return jnp.sum(y.astype(jnp.float32) ** 2)
  dt = timed(jax.jit(jax.grad(experts_loss, argnums=(0, 1, 2))), xs, wi, wo, iters=3)
  out["moe_gmms_swiglu"] = {"ms": dt * 1e3, "tflops": 6 * t * 8 * 3 * d * f / dt / 1e12}

  def attn_loss(x, wq, wk, wv, wo_):
    q = jnp.einsum("td,dnh->tnh", x, wq)[None]
    k = jnp.einsum("td,dnh->tnh", x, wk)[None]
    v = jnp.einsum("td,dnh->tnh", x, wv)[None]
    o = flash_attention(q, k, v, bf) if jax.default_backend() == "gpu" else q
    return jnp.sum(jnp.einsum("tnh,nhd->td", o[0], wo_).astype(jnp.float32) ** 2)
  wq = jax.random.normal(ks[4], (d, n, hd), bf) * 0.02
  wk = jax.random.normal(ks[5], (d, kv, hd), bf) * 0.02
  wv = jax.random.normal(ks[6], (d, kv, hd), bf) * 0.02
  wo_ = jax.random.normal(ks[7], (n, hd, d), bf) * 0.02
  xa = x[:args.seq]
  dt = timed(jax.jit(jax.grad(attn_loss, argnums=(0, 1, 2, 3, 4))), xa, wq, wk, wv, wo_, iters=5)
  fl = args.seq * (6 * (2 * d * n * hd + 2 * d * kv * hd) + 12 * args.seq * n * hd / 2)
  out["attention_block_per_seq"] = {"ms": dt * 1e3, "tflops": fl / dt / 1e12}

  emb = jax.random.normal(ks[1], (vocab, d), bf) * 0.02
  tgt = jnp.zeros((t,), jnp.int32)

  def head_loss(x, emb):   # the unfused head (einsum_f32 logits)
    logits = einsum_f32("td,vd->tv", x, emb)
    return jnp.sum(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(t), tgt])
  dt = timed(jax.jit(jax.grad(head_loss, argnums=(0, 1))), x, emb, iters=5)
  out["lm_head_loss_unfused"] = {"ms": dt * 1e3, "tflops": 6 * t * d * vocab / dt / 1e12}
  ones = jnp.ones((t,), jnp.float32)
  fused = lambda x, emb: linear_cross_entropy(x, emb, tgt, ones)   # as the train step
  dt = timed(jax.jit(jax.grad(fused, argnums=(0, 1))), x, emb, iters=5)
  out["lm_head_loss"] = {"ms": dt * 1e3, "tflops": 6 * t * d * vocab / dt / 1e12}
  for v in out.values():
    v["fraction_of_measured_peak"] = v["tflops"] / peak_meas
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--layers", type=int, default=0, help="0: as many as fit")
  p.add_argument("--max_layers", type=int, default=4)
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--ref_steps", type=int, default=2)
  p.add_argument("--state_dtype", default="bfloat16")
  p.add_argument("--remat", default="none")
  p.add_argument("--impls", default="auto", help="moe_impl values, e.g. auto,reference")
  p.add_argument("--microbatches", default="1,8,16",
                 help="gradient-accumulation counts (each microbatch = --batch x --seq tokens)")
  p.add_argument("--no_breakdown", action="store_true")
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--profile", action="store_true", help="print each variant's top device kernels")
  p.add_argument("--profile_top", type=int, default=25, help="kernels listed by --profile")
  p.add_argument("--dump_hlo", action="store_true", help="write each variant's optimized HLO to --out")
  p.add_argument("--smoke", action="store_true", help="tiny dims, to check the script on CPU")
  args = p.parse_args()
  if args.smoke:
    SMOKE.update(hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32, num_experts=16,
                 intermediate_size=64, vocab_size=512)
  dev = jax.devices()[0]
  hbm = (dev.memory_stats() or {}).get("bytes_limit", 80 * 2**30)
  info = {"device": dev.device_kind, "jax": jax.__version__, "argv": sys.argv, "hbm_gib": hbm / 2**30}
  print(info, flush=True)
  peak_meas = matmul_peak_tflops(512 if args.smoke else 8192)
  peak_sheet = datasheet_tflops(dev)
  print(f"dense bf16 matmul: {peak_meas:.0f} TFLOP/s measured; datasheet {peak_sheet:.0f}",
        flush=True)

  layers = args.layers
  if not layers:   # the most layers the compiler says fit, from max_layers down
    micro_max = max(int(a) for a in args.microbatches.split(","))
    for layers in range(args.max_layers, 0, -1):
      _, _, _, _, need, cs = build_cached(layers, "auto", micro_max, args)
      print(f"layers {layers}: needs {need / 2**30:.1f} GiB (compile {cs:.0f} s)", flush=True)
      if need is None or need < 0.92 * hbm:
        break
  results = []
  report = {**info, "peak_measured_tflops": peak_meas, "peak_datasheet_tflops": peak_sheet,
            "seq": args.seq, "batch": args.batch, "state_dtype": args.state_dtype,
            "remat": args.remat, "results": results}
  os.makedirs(args.out, exist_ok=True)

  def save():
    with open(os.path.join(args.out, "bench_train.json"), "w") as f:
      json.dump(report, f, indent=2, default=float)

  variants = [(i, int(a)) for i in args.impls.split(",") for a in args.microbatches.split(",")]
  for impl, micro in variants:
    try:
      results.append(run_variant(layers, impl, micro, args, peak_meas, peak_sheet, hbm))
    except Exception as e:  # e.g. out of memory for the reference ops: record and go on
      print(f"[{impl} x{micro}] failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
      results.append({"impl": impl, "microbatches": micro, "layers": layers,
                      "error": f"{type(e).__name__}: {str(e)[:400]}"})
    _BUILT.clear()
    jax.clear_caches()
    save()
  parts = {} if args.no_breakdown else breakdown(args, peak_meas)
  report["breakdown"] = parts
  save()
  print(f"\n{dev.device_kind}, jax {jax.__version__}; A13B width, seq {args.seq} x batch {args.batch}, "
        f"state {args.state_dtype}; peak: measured {peak_meas:.0f}, datasheet {peak_sheet:.0f} TFLOP/s")
  print("| moe_impl | microbatches | layers | step (s) | optimizer update (s) | tokens/s | "
        "model TFLOP/s | MFU (measured peak) | MFU (datasheet) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in results:
    if "error" in r:
      print(f"| {r['impl']} | {r['microbatches']} | {r['layers']} | failed: {r['error'][:60]} |||||")
      continue
    sheet = f"{100 * r['mfu_datasheet']:.1f}%" if r["mfu_datasheet"] else "n/a"
    opt = f"{r['optimizer_update_s']:.3f}" if r["optimizer_update_s"] else "-"
    print(f"| {r['impl']} | {r['microbatches']} | {r['layers']} | {r['step_s']:.3f} | {opt} | "
          f"{r['tokens_per_s']:,.0f} | {r['achieved_tflops']:.0f} | "
          f"{100 * r['mfu_measured_peak']:.1f}% | {sheet} |")
  for name, v in parts.items():
    print(f"part {name}: {v['ms']:.1f} ms, {v['tflops']:.0f} TFLOP/s "
          f"({100 * v['fraction_of_measured_peak']:.0f}% of measured peak)")


if __name__ == "__main__":
  main()

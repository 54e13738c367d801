"""Decode throughput against the HBM roofline (Tencent's setup: input 2048, output up to 14336).

For each batch size the serving Engine (random bf16 weights, full A13B width and expert count,
as many layers as fit one device next to a batch x (input + output)-token cache) is timed on:
  * time to first token: one 2048-token prompt, chunked prefill, after a warm-up request;
  * a real engine run of --output_len tokens for every slot (host loop included): tokens/s;
  * the engine's jitted decode step alone at context = input_len and = input + output (full
    cache): step time with the steps dispatched back to back as the engine's loop runs them (the
    time of one step waited for alone, host dispatch included, is printed too), and the roofline = (weight bytes read + KV bytes read) / copy bandwidth
    measured in the same run. Weight bytes count the distinct experts the step's tokens route to
    (counted by a forward over that step's tokens, not assumed uniform).
Per-layer time = (step - head) / layers, where head = embed + final norm + logits + sampling timed
alone; the 32-layer figure is head + 32 x per-layer. Tokens/s for the whole 2048 -> 16384 run uses
the mean of the two step times (step time is linear in KV length).

  python experiments/bench_decode.py [--profile]         # GPU, A13B, batches 1/16/32; top kernels
  python experiments/bench_decode.py --tensor=2           # the model over 2 GPUs (tensor parallel)
  python experiments/bench_decode.py --tp_share=2         # one GPU's share of that, on one GPU
  python experiments/bench_decode.py --quantization=fp8   # fp8 experts (the whole A13B fits one H200)
  python experiments/bench_decode.py --config=tiny --layers=2 --batches=1,2 --input_len=32 \
      --output_len=8 --full_output_len=24 --timing_steps=3    # CPU smoke run
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The layer count fills the device, so the allocator must own its memory from the start: with
# XLA_PYTHON_CLIENT_PREALLOCATE=false a 14-layer batch-1 run failed to grow its pool by 21 GiB.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
from hunyuan_jax.xla_flags import use_decode_xla_flags  # noqa: E402

use_decode_xla_flags()   # as the server and generate CLI do

import dataclasses
import gc
import json
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hunyuan_jax.config import ModelConfig, with_num_layers
from hunyuan_jax.model import forward, init_params, moe_parallel
from hunyuan_jax.model.transformer import Transformer
from hunyuan_jax.quant import quantize_experts
from hunyuan_jax.serve.engine import Engine, cache_bytes
from hunyuan_jax.serve.loader import make_mesh_for_serving, random_params
from hunyuan_jax.serve.sampling import SamplingArrays, SamplingParams, logprob_width, sample, sample_options
from profile_util import print_top, top_kernels

flags.DEFINE_string("config", "a13b", "preset")
flags.DEFINE_integer("layers", 0, "decoder layers (0: as many as fit next to the largest cache)")
flags.DEFINE_list("batches", ["1", "16", "32"], "batch sizes")
flags.DEFINE_integer("input_len", 2048, "prompt tokens")
flags.DEFINE_integer("output_len", 64, "tokens generated per slot in the real engine run")
flags.DEFINE_integer("full_output_len", 14336, "Tencent's output length: sizes the cache and the long-context step")
flags.DEFINE_integer("kv_block", 256, "engine kv_block")
flags.DEFINE_integer("timing_steps", 10, "timed repetitions of the decode step")
flags.DEFINE_string("json_out", "", "write results here")
flags.DEFINE_string("hlo_out", "", "write the decode step's optimized HLO here (batch size appended)")
flags.DEFINE_float("top_p", 1.0, "top-p of every request (< 1 adds the top-k/top-p cuts to each step)")
flags.DEFINE_integer("logprobs", None, "every request asks for its tokens' logprobs and this many top ones")
flags.DEFINE_integer("logit_bias", 0, "every request sets a logit_bias of this many ids (the bias pass runs each step)")
flags.DEFINE_bool("fused_qkv", True, "one q/k/v GEMM per layer (Engine fused_qkv); --nofused_qkv for an A/B")
flags.DEFINE_bool("profile", False, "print the top device kernels of the decode step at full context")
flags.DEFINE_integer("profile_top", 15, "kernels listed by --profile")
flags.DEFINE_enum("quantization", "none", ["none", "fp8"], "fp8: the routed experts in e4m3 (hunyuan_jax.quant)")
flags.DEFINE_integer("tensor", 1, "tensor-parallel devices (heads, FFN width and KV heads split)")
flags.DEFINE_integer("expert", 1, "expert-parallel devices")
flags.DEFINE_integer("tp_share", 1, "time one device's share of an N-way tensor-parallel step on this one "
                     "device: heads, KV heads and FFN widths / N, embedding and head whole; no all-reduces")
FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


PREFIX_TURN = 64   # new tokens of the next-turn TTFT (a chat turn on the prefix cache)


def tp_share_config(cfg: ModelConfig, n: int) -> ModelConfig:
  """The per-device shapes of `n`-way tensor parallelism (see hunyuan_jax/sharding.py's rules)."""
  widths = dict(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size)
  bad = [k for k, v in widths.items() if v % n] + [k for k in ("moe_intermediate_size", "shared_expert_size")
                                                  if any(v % n for v in getattr(cfg, k))]
  if bad:
    raise app.UsageError(f"--tp_share={n} does not divide {', '.join(bad)} of --config={FLAGS.config}")
  return cfg.replace(**{k: v // n for k, v in widths.items()},
                     moe_intermediate_size=tuple(v // n for v in cfg.moe_intermediate_size),
                     shared_expert_size=tuple(v // n for v in cfg.shared_expert_size))


def copy_bandwidth(nbytes=2 << 30, rounds=10, batch=4) -> float:
  """Device copy, bytes read + written per second (the BENCHMARKS.md convention).

  Best round of `batch` back-to-back copies after a warm-up: one copy waited for alone read
  2.41-2.78 TB/s on the same H100 (clocks ramping, host sync), which inflated the fractions.
  """
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(lambda a: a * 1.0001)
  for _ in range(3):
    f(x).block_until_ready()
  best = 1e9
  for _ in range(rounds):
    t = time.perf_counter()
    outs = [f(x) for _ in range(batch)]
    jax.block_until_ready(outs)
    best = min(best, (time.perf_counter() - t) / batch)
    del outs
  del x
  return 2 * nbytes / best


def _bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def layer_weight_bytes(params, cfg, distinct_experts: float) -> tuple[float, float]:
  """-> (bytes per layer actually read, head bytes: embedding row gather ~0 + logits matrix + norms)."""
  g = params["groups_0"]
  n = cfg.num_layers
  total = _bytes(g) / n
  moe = g["layer_0"]["moe"]
  experts = ("wi", "wo", "wi_fp8", "wi_scale", "wo_fp8", "wo_scale")   # bf16 or quant.fp8's layout
  expert_bytes = sum(moe[k].nbytes for k in experts if k in moe) / n / cfg.num_experts
  layer = total - expert_bytes * cfg.num_experts + expert_bytes * distinct_experts
  head = params["embed"].nbytes if cfg.tie_word_embeddings else params["lm_head"].nbytes
  return layer, head + params["final_norm"]["scale"].nbytes


def uniform_distinct_experts(cfg, b) -> float:
  """Expected distinct experts per layer for b tokens routed uniformly: E (1 - (1 - k/E)^b);
  8 at batch 1, 56.5 at 16, 63.1 at 32 for A13B. Printed beside the routed count only."""
  e, k = cfg.num_experts, cfg.moe_top_k[0]
  return e * (1 - (1 - k / e) ** b)


def routed_experts(eng: Engine) -> float:
  """Distinct experts per layer (mean over layers) that the engine's next decode step routes to:
  the expert bytes that step reads. Counted, not assumed: random weights need not route uniformly."""
  kv_len = eng._kv_len(int(np.max(np.asarray(eng.state.positions_b))) + 1)

  def expert_fracs(params, cache, state):
    small = jax.tree.map(lambda x: x[:, :, :, :kv_len], cache)
    with moe_parallel.use_mesh(eng.mesh):
      out = forward(params, state.tokens_b[:, None], state.positions_b[:, None], small, cfg=eng.cfg)
    return [s.expert_frac_e for s in out.moe_stats.values()]
  fracs = jax.jit(expert_fracs)(eng.params, eng.cache, eng.state)
  per_layer = np.concatenate([np.asarray(f).reshape(-1, f.shape[-1]) for f in fracs])
  return float((per_layer > 0).sum(-1).mean())


def sampled(b: int) -> SamplingArrays:
  """Temperature-1 sampling, one seed per slot. Random weights decoded greedily make every slot emit
  the same few tokens, so a batch routes to far fewer experts than distinct requests do (24.6 of
  64 at batch 16 on 2 x H200, uniform: 56.4); sampled tokens differ per slot, as requests do."""
  return SamplingArrays.from_params([sampling_params()] * b, [0] * b, list(range(b)))


def sampling_params(**kw) -> SamplingParams:
  """Temperature 1, and top-p where --top_p < 1 (the top-k/top-p cuts then run every step)."""
  bias = {i * 7 + 1: 0.5 for i in range(FLAGS.logit_bias)}
  return SamplingParams(temperature=1.0, top_p=FLAGS.top_p, logprobs=FLAGS.logprobs, logit_bias=bias, **kw)


def time_fn(fn, args_fn, steps):
  """Seconds per call with `steps` calls dispatched back to back (as the engine's loop runs)."""
  out = fn(*args_fn())
  jax.block_until_ready(out)
  args = [args_fn() for _ in range(steps)]
  t = time.perf_counter()
  for a in args:
    out = fn(*a)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / steps


def head_time(params, cfg, b, steps) -> float:
  """Embedding, final norm, logits and sampling: the per-step cost outside the layers."""
  model = Transformer(cfg)
  sp = sampled(b)

  def head(p, t):
    h = model.apply({"params": p}, t, method=Transformer.embed_tokens)
    h = model.apply({"params": p}, h, method=lambda m, x: m.final_norm(x))
    logits = model.apply({"params": p}, h, method=Transformer.logits)[:, 0]
    return sample(logits, sp, jnp.zeros(logits.shape, jnp.int32), jnp.zeros(logits.shape, bool),
                  sample_options([sampling_params()]))
  f = jax.jit(head)
  toks = jnp.zeros((b, 1), jnp.int32)
  return time_fn(f, lambda: (params, toks), steps)


def decode_step_time(eng: Engine, context: int, steps: int, profile: str = "") -> tuple[float, float]:
  """The engine's jitted decode step with every slot at `context` tokens (state donated).

  Returns (pipelined, synchronous) seconds per step: `steps` steps dispatched back to back, as
  the engine runs them (it dispatches step n+1 before it reads step n's tokens, so the host's
  dispatch overlaps the device), and the median of single steps each waited for (host dispatch
  included: the latency of one step). `profile`: a title; prints the step's top device kernels.
  """
  b = eng.max_slots
  active = np.ones(b, bool)
  pos = np.full(b, context - 1, np.int32)
  kv_len = eng._decode_kv_len(context)
  sp = sampled(b)
  tokens = np.random.default_rng(context).integers(0, min(eng.cfg.vocab_size, 30000), b)
  # positions then advance by one per step; the tokens are the slots' own samples from here on
  eng.state = eng._set_rows(eng.state, active, pos, sp)._replace(tokens_b=jnp.asarray(tokens, jnp.int32))

  def run():
    _, _, eng.cache, eng.state = eng._decode(eng.params, eng.cache, eng.state, kv_len=kv_len,
                                             options=sample_options([sampling_params()]),
                                             logprobs=logprob_width([sampling_params()]))
    return eng.state.tokens_b
  run()
  jax.block_until_ready(eng.state)
  ts = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(run())
    ts.append(time.perf_counter() - t)
  t = time.perf_counter()
  for _ in range(steps):
    out = run()
  jax.block_until_ready(out)
  pipelined = (time.perf_counter() - t) / steps
  if profile:
    print_top(profile, top_kernels(run, iters=3, top=FLAGS.profile_top))
  if FLAGS.hlo_out:   # the program the timing ran, as XLA optimized it (fusion names match the profile)
    lowered = eng._decode.lower(eng.params, eng.cache, eng.state, kv_len=kv_len,
                                options=sample_options([sampling_params()]),
                                logprobs=logprob_width([sampling_params()]))
    with open(f"{FLAGS.hlo_out}.b{b}", "w") as f:
      f.write(lowered.compile().as_text())
  return pipelined, float(np.median(ts))


def first_token_s(eng: Engine, prompt, params):
  r = eng.submit(prompt, params)
  t = time.perf_counter()
  while not r.output_ids:
    eng.step()
  ttft = time.perf_counter() - t
  while not r.done:
    eng.step()
  return ttft, r


def engine_run(eng: Engine, b: int, input_len: int, output_len: int, vocab: int):
  """TTFT of one prompt and of a next turn (PREFIX_TURN more tokens on the prefix cache), each
  after a warm-up request, then b prompts x output_len tokens through the loop."""
  rng = np.random.default_rng(0)
  prompt = lambda: [int(t) for t in rng.integers(0, min(vocab, 30000), input_len)]
  params = sampling_params(max_tokens=output_len, ignore_eos=True)
  two = dataclasses.replace(params, max_tokens=2)
  extra = min(PREFIX_TURN, eng.max_len - input_len - 4)
  turn = lambda r: r.prompt_ids + r.output_ids + prompt()[:extra]
  warm = eng.generate([prompt()], two)[0]          # compile prefill + decode
  eng.generate([turn(warm)], two)                  # and a next turn's prefill
  ttft, r = first_token_s(eng, prompt(), two)
  ttft_turn, r = first_token_s(eng, turn(r), two)
  assert r.cached == input_len + 1, r.cached       # the prompt and the first output token
  reqs = [eng.submit(prompt(), dataclasses.replace(params, seed=i)) for i in range(b)]
  t0 = time.perf_counter()
  while not all(q.output_ids for q in reqs):
    eng.step()
  t_first = time.perf_counter() - t0
  n0 = sum(len(q.output_ids) for q in reqs)
  t1 = time.perf_counter()
  while not all(q.done for q in reqs):
    eng.step()
  t_dec = time.perf_counter() - t1
  n = sum(len(q.output_ids) for q in reqs) - n0
  return ttft, ttft_turn, t_first, n / t_dec


def _in_use(dev) -> float:
  return (dev.memory_stats() or {}).get("bytes_in_use", 0) / 2**30


def pick_layers(cfg, b_max, max_len, n_dev=1) -> int:
  """Layers that fit next to a b_max x max_len cache, weights and cache split over n_dev devices."""
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit", 0)
  if not limit:
    return 2
  one = with_num_layers(cfg, 1)
  shapes = jax.eval_shape(lambda: quantize_experts(init_params(one, jax.random.key(0)), FLAGS.quantization))
  per_layer = _bytes(shapes["groups_0"])
  head = _bytes(shapes) - per_layer
  cache_layer = 2 * b_max * max_len * cfg.num_kv_heads * cfg.head_dim * 2
  # the decode step may hold a second copy of the cache (scan outputs); keep 6 GB for activations
  n = int((limit - head - (6 << 30)) // ((per_layer + 2 * cache_layer) / n_dev))
  return max(1, min(cfg.num_layers, n))


def main(_):
  cfg = ModelConfig.from_pretrained(FLAGS.config)
  share = FLAGS.tp_share
  if share > 1:
    cfg = tp_share_config(cfg, share)
  batches = [int(b) for b in FLAGS.batches]
  max_len = FLAGS.input_len + FLAGS.full_output_len
  mesh = make_mesh_for_serving(FLAGS.tensor, FLAGS.expert)
  n_dev = FLAGS.tensor * FLAGS.expert
  n_layers = FLAGS.layers or pick_layers(cfg, max(batches), max_len, n_dev)
  if not FLAGS.layers and os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() == "false":
    print("warning: XLA_PYTHON_CLIENT_PREALLOCATE=false and a layer count that fills the device can "
          "run out of memory growing the pool; unset it or pass --layers", flush=True)
  cfg = with_num_layers(cfg, n_layers)
  dev = jax.devices()[0]
  print(f"device {n_dev} x {dev.device_kind} (mesh {dict(mesh.shape) if mesh else None}) | jax {jax.__version__} | "
        f"{FLAGS.config} x {n_layers} layers | experts {FLAGS.quantization} | input {FLAGS.input_len} output {FLAGS.output_len} (cache {max_len})",
        flush=True)
  bw1 = copy_bandwidth() if dev.platform == "gpu" else copy_bandwidth(64 << 20)
  # The roofline reads every distinct byte once at the devices' summed bandwidth. Replicated
  # weights (embedding, router, norms) are read by every device but count once: their
  # replication shows as lost fraction.
  bw = bw1 * n_dev
  print(f"copy bandwidth {bw1 / 1e12:.3f} TB/s per device (read + written), x{n_dev} = {bw / 1e12:.3f}", flush=True)
  params = random_params(cfg, mesh, 0, FLAGS.quantization)
  print(f"weights {_bytes(params) / 2**30:.1f} GiB; device 0 holds {_in_use(dev):.1f} GiB", flush=True)
  kv_row = cfg.num_kv_layers * 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
  full_kv_row = kv_row / n_layers * 32
  rows = []
  for b in batches:
    try:
      eng = Engine(cfg, params, max_slots=b, max_len=max_len, prefill_chunk=FLAGS.input_len,
                   kv_block=FLAGS.kv_block, mesh=mesh, fused_qkv=FLAGS.fused_qkv)
      print(f"batch {b}: cache {eng.cache_bytes / 2**30:.1f} GiB, read in place by the kernel: "
            f"{eng.cache_in_place}; device 0 holds {_in_use(dev):.1f} GiB", flush=True)
      t_stage = time.perf_counter()
      ttft, ttft_turn, t_first, tok_s_run = engine_run(eng, b, FLAGS.input_len, FLAGS.output_len, cfg.vocab_size)
      # Every timed step (and the profiler's) must stay inside the cache: a slot at a position
      # past it reads no rows (its writes are dropped), which would time a step without its KV.
      ctx_lo, ctx_hi = FLAGS.input_len + 1, max_len - 2 * FLAGS.timing_steps - 16
      t_lo = decode_step_time(eng, ctx_lo, FLAGS.timing_steps)
      ex_lo = routed_experts(eng)
      t_hi = decode_step_time(eng, ctx_hi, FLAGS.timing_steps,
                              profile=f"decode step, batch {b}, context {ctx_hi}" if FLAGS.profile else "")
      ex_hi = routed_experts(eng)
      t_head = head_time(params, cfg, b, FLAGS.timing_steps)
    except jax.errors.JaxRuntimeError as e:   # report the batch that does not fit, go on
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      here = [f for f in traceback.extract_tb(e.__traceback__) if REPO in f.filename][-3:]
      print(f"batch {b}: out of device memory ({str(e)[:200]}) at "
            + " <- ".join(f"{os.path.relpath(f.filename, REPO)}:{f.lineno}" for f in reversed(here)),
            flush=True)
      eng = None
      gc.collect()
      continue
    print(f"batch {b}: measured in {time.perf_counter() - t_stage:.0f} s (compiles included)", flush=True)
    row = dict(batch=b, layers=n_layers, cache_gib=cache_bytes(eng.cache) / 2**30, ttft_s=ttft, ttft_turn_s=ttft_turn,
               first_tokens_all_s=t_first, engine_tok_s=tok_s_run, head_ms=t_head * 1e3,
               uniform_distinct_experts=uniform_distinct_experts(cfg, b))
    for name, ctx, (t, t_sync), ex in (("lo", ctx_lo, t_lo, ex_lo), ("hi", ctx_hi, t_hi, ex_hi)):
      w_layer, w_head = layer_weight_bytes(params, cfg, ex)
      row[f"distinct_experts_{name}"] = ex
      kv = b * ctx * kv_row
      roof = (w_head + n_layers * w_layer + kv) / bw
      if share > 1:   # the share's step against the N-device roofline: the head read once over N devices
        row[f"frac_tp_{name}"] = (roof - w_head * (1 - 1 / share) / bw) / t
      per_layer = (t - t_head) / n_layers
      t32 = t_head + 32 * per_layer
      roof32 = (w_head + 32 * w_layer + b * ctx * full_kv_row) / bw
      row.update({f"step_ms_{name}": t * 1e3, f"sync_step_ms_{name}": t_sync * 1e3,
                  f"roof_ms_{name}": roof * 1e3, f"frac_{name}": roof / t,
                  f"per_layer_ms_{name}": per_layer * 1e3, f"step32_ms_{name}": t32 * 1e3,
                  f"frac32_{name}": roof32 / t32, f"ctx_{name}": ctx})
    mean32 = (row["step32_ms_lo"] + row["step32_ms_hi"]) / 2e3
    row["tencent_tok_s_32l"] = b / mean32
    rows.append(row)
    print(json.dumps(row), flush=True)
    del eng
    gc.collect()
  print(f"\n| batch | TTFT {FLAGS.input_len} (s) | TTFT next turn, +{min(PREFIX_TURN, FLAGS.full_output_len - 4)} on {FLAGS.input_len + 1} cached (s) | engine tok/s ({n_layers}L, ctx {FLAGS.input_len}+{FLAGS.output_len}) "
        f"| step ms @{FLAGS.input_len + 1} / roofline / frac | step ms @{max_len - 2 * FLAGS.timing_steps - 16} / roofline / frac "
        f"| per-layer ms lo/hi | 32L step ms lo/hi | 32L frac lo/hi | 32L tok/s (2048->16384) "
        f"| one step waited for, ms lo/hi | experts read lo/hi (uniform) |")
  print("|" + "---|" * 12)
  for r in rows:
    print(f"| {r['batch']} | {r['ttft_s']:.3f} | {r['ttft_turn_s']:.3f} | {r['engine_tok_s']:.1f} | {r['step_ms_lo']:.2f} / "
          f"{r['roof_ms_lo']:.2f} / {r['frac_lo']:.0%} | {r['step_ms_hi']:.2f} / {r['roof_ms_hi']:.2f} / "
          f"{r['frac_hi']:.0%} | {r['per_layer_ms_lo']:.3f} / {r['per_layer_ms_hi']:.3f} | "
          f"{r['step32_ms_lo']:.1f} / {r['step32_ms_hi']:.1f} | {r['frac32_lo']:.0%} / {r['frac32_hi']:.0%} | "
          f"{r['tencent_tok_s_32l']:.1f} | {r['sync_step_ms_lo']:.2f} / {r['sync_step_ms_hi']:.2f} | "
          f"{r['distinct_experts_lo']:.1f} / {r['distinct_experts_hi']:.1f} ({r['uniform_distinct_experts']:.1f}) |")
  if share > 1:
    print(f"\nOne device's share of {share}-way tensor parallelism (no all-reduces), against the {share}-device "
          "roofline (the replicated head read once):")
    for r in rows:
      print(f"batch {r['batch']}: {r['frac_tp_lo']:.0%} @{r['ctx_lo']} / {r['frac_tp_hi']:.0%} @{r['ctx_hi']}")
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(dict(device=dev.device_kind, devices=n_dev, jax=jax.__version__, copy_bw=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
  app.run(main)

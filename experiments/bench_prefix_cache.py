"""What the prefix cache saves: time to first token with it on and off, on the serving Engine.

Two cases, each timed after a warm-up of the same shapes (random bf16 weights, A13B width):
  * n copies of one prompt submitted together (OpenAI's `n`, or a burst sharing a long system
    prompt): time until every copy has its first token;
  * a conversation's next turn: the previous prompt and reply plus --turn new tokens;
  * n conversations' next turns submitted together.

  python experiments/bench_prefix_cache.py                     # GPU: A13B x 7 layers, 2048-token prompts
  python experiments/bench_prefix_cache.py --config=tiny --layers=2 --prompt_len=64 --turn=8   # CPU smoke
"""
from __future__ import annotations

import gc
import time

import numpy as np
from absl import app, flags

from bench_decode import sampling_params, with_num_layers   # sets the decode XLA flags first
from hunyuan_jax.config import ModelConfig
from hunyuan_jax.serve.engine import Engine
from hunyuan_jax.serve.loader import random_params

flags.DEFINE_integer("prompt_len", 2048, "tokens per prompt")
flags.DEFINE_integer("n", 4, "copies of one prompt submitted together")
flags.DEFINE_integer("turn", 64, "new tokens of the next turn")
FLAGS = flags.FLAGS


def until_first_tokens(eng: Engine, prompts, params) -> tuple[float, list]:
  reqs = [eng.submit(p, params) for p in prompts]
  t = time.perf_counter()
  while not all(r.output_ids for r in reqs):
    eng.step()
  dt = time.perf_counter() - t
  while not all(r.done for r in reqs):
    eng.step()
  return dt, reqs


def measure(cfg, params, caching: bool) -> dict:
  n, length = FLAGS.n, FLAGS.prompt_len
  eng = Engine(cfg, params, max_slots=n, max_len=length + FLAGS.turn + 16, prefill_chunk=length,
               prefix_caching=caching)
  rng = np.random.default_rng(0)
  prompt = lambda k: [int(t) for t in rng.integers(0, min(cfg.vocab_size, 30000), k)]
  two = sampling_params(max_tokens=2, ignore_eos=True)
  out = {}
  turn = lambda r: r.prompt_ids + r.output_ids + prompt(FLAGS.turn)
  for timed in (False, True):   # the first round compiles every program the second one runs
    p = prompt(length)
    t_n, reqs = until_first_tokens(eng, [p] * n, two)
    t_turn, (nxt,) = until_first_tokens(eng, [turn(reqs[0])], two)
    _, talks = until_first_tokens(eng, [prompt(length) for _ in range(n)], two)
    t_turns, turns = until_first_tokens(eng, [turn(r) for r in talks], two)
    if timed:
      out = dict(caching=caching, n_copies_s=t_n, n_cached=[r.cached for r in reqs], turn_s=t_turn,
                 turn_cached=nxt.cached, turns_s=t_turns, turns_cached=[r.cached for r in turns])
  del eng
  gc.collect()
  return out


def main(_):
  import jax
  cfg = ModelConfig.from_pretrained(FLAGS.config)
  cfg = with_num_layers(cfg, FLAGS.layers or 7)
  params = random_params(cfg, None, 0)
  print(f"{jax.devices()[0].device_kind} | jax {jax.__version__} | {FLAGS.config} x {cfg.num_layers} layers | "
        f"prompt {FLAGS.prompt_len}, n {FLAGS.n}, next turn +{FLAGS.turn}", flush=True)
  rows = [measure(cfg, params, caching) for caching in (False, True)]
  print(f"\n| prefix cache | {FLAGS.n} copies of a {FLAGS.prompt_len}-token prompt: all first tokens (s) "
        f"| cached per copy | next turn (+{FLAGS.turn}) TTFT (s) | cached | {FLAGS.n} next turns at once: "
        f"all first tokens (s) | cached per turn |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {'on' if r['caching'] else 'off'} | {r['n_copies_s']:.3f} | {r['n_cached']} | {r['turn_s']:.3f} "
          f"| {r['turn_cached']} | {r['turns_s']:.3f} | {r['turns_cached']} |")


if __name__ == "__main__":
  app.run(main)

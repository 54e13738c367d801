"""The OpenAI server under load, as a client sees it: TTFT, inter-token latency, throughput.

vLLM's `benchmark_serving` in miniature, on the standard library alone (the device image has no
`openai`): --num_prompts streamed /v1/completions requests of --input_len random token ids
(the first --shared_prefix_len of them common to all, to exercise the prefix cache), each
generating --output_len tokens (ignore_eos), arriving as a Poisson process at --request_rate
per second (inf: all at once), at most --max_concurrency in flight.

  python experiments/bench_serving.py --base_url=http://127.0.0.1:8000     # a running server
  python experiments/bench_serving.py --random_weights --config=a13b --override=num_layers=7 --max_slots=32
  python experiments/bench_serving.py --random_weights --config=tiny --max_slots=8 --num_prompts=16 \
      --input_len=48 --output_len=16 --max_len=128                         # CPU smoke run
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import http.client
import json
import tempfile
import threading
import time
import urllib.parse

import numpy as np
from absl import app, flags

from hunyuan_jax.serve.model_flags import define_model_flags, load_from_flags
from hunyuan_jax.serve.sampling import SamplingParams

define_model_flags()
flags.DEFINE_string("base_url", None, "a running server; without it one is started here from the model flags")
flags.DEFINE_integer("max_slots", 32, "decode slots of the server started here")
flags.DEFINE_integer("prefill_chunk", 2048, "prefill chunk of the server started here")
flags.DEFINE_integer("num_prompts", 64, "requests")
flags.DEFINE_integer("input_len", 1024, "prompt tokens")
flags.DEFINE_integer("shared_prefix_len", 0, "leading prompt tokens common to every request")
flags.DEFINE_integer("output_len", 128, "generated tokens per request")
flags.DEFINE_float("request_rate", float("inf"), "mean arrivals per second (Poisson); inf: all at once")
flags.DEFINE_integer("max_concurrency", 0, "requests in flight at most (0: no limit)")
flags.DEFINE_integer("vocab_limit", 30000, "prompt ids are drawn below this (and below the model's vocabulary)")
flags.DEFINE_integer("seed", 0, "prompt and arrival seed")
flags.DEFINE_string("json_out", "", "write every request's timings here")
flags.DEFINE_bool("precompile", False, "the server started here compiles every program first (serve --precompile); "
                  "then no warm-up round runs")
FLAGS = flags.FLAGS


def id_tokenizer_file(vocab: int) -> str:
  """A stand-in tokenizer.json for random weights of a real vocabulary (no tokenizer files here):
  token i spells "<i>". The load is token ids in, so only the server's detokenizer uses it."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab)}, unk_token="<0>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  path = os.path.join(tempfile.mkdtemp(), "tokenizer.json")
  tok.save(path)
  return path


def start_server():
  from hunyuan_jax.config import ModelConfig, override_from_strings
  from hunyuan_jax.serve.loader import build_engine, chat_family_for
  from hunyuan_jax.serve.server import ServeContext, Server
  from hunyuan_jax.tokenizer import ByteTokenizer
  if FLAGS.random_weights and not FLAGS.tokenizer:
    vocab = override_from_strings(ModelConfig.from_pretrained(FLAGS.config), FLAGS.override).vocab_size
    if vocab != ByteTokenizer().vocab_size:
      FLAGS.tokenizer = id_tokenizer_file(vocab)
  _, cfg, params, tok = load_from_flags()
  max_len = FLAGS.max_len or FLAGS.input_len + FLAGS.output_len + 16
  engine, _ = build_engine(cfg, params, tok, max_slots=FLAGS.max_slots, max_len=max_len,
                           prefill_chunk=FLAGS.prefill_chunk)
  if FLAGS.precompile:
    t = time.perf_counter()
    n = engine.precompile([SamplingParams(temperature=1.0, ignore_eos=True)])
    print(f"precompiled {n} programs in {time.perf_counter() - t:.1f} s", flush=True)
  name = FLAGS.config or "model"
  server = Server(ServeContext(engine, tok, name, chat_family_for(cfg, tok), quiet=True), port=0).start()
  return server, cfg.vocab_size


def stream_completion(url: str, body: dict) -> dict:
  """One streamed request: arrival-relative times of each chunk that carries text, and usage."""
  u = urllib.parse.urlparse(url)
  conn = http.client.HTTPConnection(u.hostname, u.port, timeout=3600)
  t0 = time.perf_counter()
  conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
  resp = conn.getresponse()
  if resp.status != 200:
    return {"error": f"{resp.status}: {resp.read()[:300]!r}"}
  times, usage = [], None
  for line in resp:
    line = line.strip()
    if not line.startswith(b"data: ") or line == b"data: [DONE]":
      continue
    chunk = json.loads(line[6:])
    if chunk.get("usage"):
      usage = chunk["usage"]
    if chunk.get("choices") and chunk["choices"][0].get("text"):
      times.append(time.perf_counter() - t0)
  conn.close()
  return {"chunk_s": times, "usage": usage, "end_s": time.perf_counter() - t0}


def run_load(url: str, model: str, vocab: int, seed: int) -> tuple[list, float]:
  rng = np.random.default_rng(seed)
  hi = min(vocab, FLAGS.vocab_limit)
  shared = rng.integers(0, hi, FLAGS.shared_prefix_len).tolist()
  prompts = [shared + rng.integers(0, hi, FLAGS.input_len - len(shared)).tolist() for _ in range(FLAGS.num_prompts)]
  gaps = (np.zeros(len(prompts)) if FLAGS.request_rate == float("inf")
          else rng.exponential(1 / FLAGS.request_rate, len(prompts)))
  limit = threading.Semaphore(FLAGS.max_concurrency or len(prompts))
  results = [None] * len(prompts)

  def go(i):
    with limit:
      body = {"model": model, "prompt": prompts[i], "max_tokens": FLAGS.output_len, "temperature": 1.0,
              "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
      try:
        results[i] = stream_completion(url, body)
      except OSError as e:   # counted as failed, with the reason
        results[i] = {"error": repr(e)}

  threads = []
  t0 = time.perf_counter()
  for i, gap in enumerate(gaps):
    time.sleep(gap)
    threads.append(threading.Thread(target=go, args=(i,)))
    threads[-1].start()
  for t in threads:
    t.join()
  return results, time.perf_counter() - t0


def summarize(results, wall: float) -> dict:
  ok = [r for r in results if r and "error" not in r and r["chunk_s"]]
  ttft = np.array([r["chunk_s"][0] for r in ok])
  itl = np.concatenate([np.diff(r["chunk_s"]) for r in ok]) if ok else np.zeros(0)
  tpot = np.array([(r["end_s"] - r["chunk_s"][0]) / max(1, r["usage"]["completion_tokens"] - 1) for r in ok])
  out_tokens = sum(r["usage"]["completion_tokens"] for r in ok)
  cached = sum(r["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) for r in ok)
  ms = lambda a, q: float(np.percentile(a, q) * 1e3) if len(a) else float("nan")
  errors = sorted({r["error"][:120] for r in results if r and "error" in r})
  return {"completed": len(ok), "failed": len(results) - len(ok), "errors": errors, "wall_s": wall,
          "request_per_s": len(ok) / wall, "output_tok_s": out_tokens / wall,
          "prompt_tokens_cached": cached,
          **{f"{name}_ms_{k}": ms(a, q) for name, a in (("ttft", ttft), ("tpot", tpot), ("itl", itl))
             for k, q in (("p50", 50), ("p99", 99))},
          "ttft_ms_mean": float(ttft.mean() * 1e3) if len(ttft) else float("nan")}


def main(_):
  server = None
  if FLAGS.base_url:
    url, vocab = FLAGS.base_url, FLAGS.vocab_limit
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port)
    conn.request("GET", "/v1/models")
    model = json.loads(conn.getresponse().read())["data"][0]["id"]
  else:
    server, vocab = start_server()
    url, model = server.url, FLAGS.config or "model"
  print(f"{url} | model {model} | {FLAGS.num_prompts} prompts x {FLAGS.input_len} tokens "
        f"({FLAGS.shared_prefix_len} shared) -> {FLAGS.output_len} | rate {FLAGS.request_rate}/s, "
        f"concurrency {FLAGS.max_concurrency or 'unlimited'}", flush=True)
  if server is not None and not FLAGS.precompile:   # a warm-up round of other prompts compiles first
    run_load(url, model, vocab, FLAGS.seed + 1)
  results, wall = run_load(url, model, vocab, FLAGS.seed)
  s = summarize(results, wall)
  print(json.dumps(s), flush=True)
  print("\n| completed | req/s | output tok/s | TTFT ms p50 / p99 | TPOT ms p50 / p99 | ITL ms p50 / p99 "
        "| prompt tokens cached |\n|---|---|---|---|---|---|---|")
  print(f"| {s['completed']} ({s['failed']} failed) | {s['request_per_s']:.2f} | {s['output_tok_s']:.1f} | "
        f"{s['ttft_ms_p50']:.1f} / {s['ttft_ms_p99']:.1f} | {s['tpot_ms_p50']:.2f} / {s['tpot_ms_p99']:.2f} | "
        f"{s['itl_ms_p50']:.2f} / {s['itl_ms_p99']:.2f} | {s['prompt_tokens_cached']} |")
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump({"summary": s, "requests": results}, f)
  if server is not None:
    server.shutdown()


if __name__ == "__main__":
  app.run(main)

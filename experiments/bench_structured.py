"""Structured outputs' cost: host mask time per grammar state, and decode tokens/s with guided rows.

Host (any machine): the token table of a byte-level BPE vocabulary (--tokenizer, or one of
--train_vocab tokens trained here on the Python standard library's sources), then a scripted A13B
reply (reasoning, then a forced tool call) walked token by token: mask time of each state the
first time (computed) and the second (cached).
Device: the serving Engine with random weights (--config, --layers) at each batch size: tokens/s
of b unguided requests (a prompt each), then with 1 or b of them guided by
  * "free": a grammar that allows every token, so the rows take the same tokens as unguided: the
    mechanism's own cost (forward and masked sampling as two programs, the host's masks);
  * "tool": a forced named tool call. A random model keeps its string argument open (the cached
    string state), but its rows now take other tokens than unguided ones, so they route to
    other experts: with random weights this row mixes the guide's cost with a routing change.

  python experiments/bench_structured.py --layers=4 --batches=1,8
  python experiments/bench_structured.py --config=tiny --layers=2 --batches=1,2 --output_len=16   # CPU smoke
"""
from __future__ import annotations

import glob
import json
import os
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hunyuan_jax.xla_flags import use_decode_xla_flags  # noqa: E402

use_decode_xla_flags()

import jax
import numpy as np
from absl import app, flags

from hunyuan_jax.chat import render_chat
from hunyuan_jax.config import ModelConfig
from hunyuan_jax.serve import structured
from hunyuan_jax.serve.engine import Engine
from hunyuan_jax.serve.loader import random_params
from hunyuan_jax.serve.sampling import SamplingParams
from hunyuan_jax.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

flags.DEFINE_string("config", "a13b", "preset")
flags.DEFINE_integer("layers", 4, "decoder layers")
flags.DEFINE_list("batches", ["1", "8"], "batch sizes")
flags.DEFINE_integer("output_len", 128, "tokens per request in each timed run")
flags.DEFINE_string("tokenizer", "", "a tokenizer.json or model folder (default: train a BPE here)")
flags.DEFINE_integer("train_vocab", 128000, "vocabulary of the BPE trained when --tokenizer is not given")
flags.DEFINE_string("json_out", "", "write results here")
FLAGS = flags.FLAGS

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
                                     "days": {"type": "integer"}}, "required": ["city"]}}}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
REPLY = ('<think>The user asks about the weather in Paris, so I call "get_weather" with the city and unit.'
         '</think>\n<answer>\n<tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris, France", '
         '"unit": "celsius", "days": 12}}]</tool_calls>\n</answer>')


def tokenizer_for(cfg: ModelConfig):
  if FLAGS.tokenizer:
    return load_tokenizer(FLAGS.tokenizer)
  if cfg.vocab_size < 1000:
    return ByteTokenizer()
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  files = [f for key in ("stdlib", "purelib")
           for f in sorted(glob.glob(os.path.join(sysconfig.get_paths()[key], "**", "*.py"), recursive=True))][:40000]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  vocab = min(FLAGS.train_vocab, cfg.vocab_size)
  t = time.perf_counter()
  texts = (open(f, encoding="utf-8", errors="ignore").read() for f in files)
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|eos|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  path = os.path.join(tempfile.mkdtemp(), "tokenizer.json")
  tok.save(path)
  print(f"trained a {tok.get_vocab_size()}-token BPE on {len(files)} files in {time.perf_counter() - t:.1f} s")
  return HFTokenizer.from_file(path, eos_ids=[0])


def host_masks(tok, cfg) -> dict:
  t = time.perf_counter()
  table = structured.token_table(tok, cfg.vocab_size, tok.eos_ids)
  t_table = time.perf_counter() - t
  prompt = render_chat([{"role": "user", "content": "weather in Paris?"}], "a13b", tools=TOOLS)
  grammar = structured.chat_grammar("a13b", prompt, tools=TOOLS, tool_choice=NAMED)
  ids = tok.encode(REPLY)
  passes = []
  for _ in range(2):
    guide, times = structured.Guide(grammar, table), []
    for i in ids:
      t = time.perf_counter()
      guide.allowed_bits()
      times.append(time.perf_counter() - t)
      assert guide.advance(i), tok.decode([i])
    assert guide.finished
    passes.append(times)
  first, cached = np.array(passes[0]) * 1e3, np.array(passes[1]) * 1e3
  return dict(vocab=int(table.vocab_size), table_s=t_table, reply_tokens=len(ids), states=len(grammar._states),
              first_mean_ms=float(first.mean()), first_max_ms=float(first.max()), first_total_s=float(first.sum() / 1e3),
              cached_mean_ms=float(cached.mean()))


def tokens_per_s(eng: Engine, prompts, b: int, guided: int, grammar) -> tuple[float, int]:
  params = SamplingParams(temperature=0.0, max_tokens=FLAGS.output_len, ignore_eos=True)
  reqs = [eng.submit(prompts[i], params, guide=eng.guide(grammar) if i < guided else None) for i in range(b)]
  while not all(r.output_ids for r in reqs):
    eng.step()
  n0, t = sum(len(r.output_ids) for r in reqs), time.perf_counter()
  while not all(r.done for r in reqs):
    eng.step()
  dt = time.perf_counter() - t
  # a guided row whose sampled token its mask did not allow is aborted: the device honoured every mask
  assert not [r for r in reqs if r.finish_reason == "abort"], "a guided row took a token outside its mask"
  n = sum(len(r.output_ids) for r in reqs) - n0
  return n / dt, n


def main(_):
  cfg = ModelConfig.from_pretrained(FLAGS.config)
  cfg = cfg.replace(num_layers=FLAGS.layers, **{
      f: getattr(cfg, f)[:FLAGS.layers] for f in cfg.__dataclass_fields__
      if isinstance(getattr(cfg, f), tuple) and len(getattr(cfg, f)) == cfg.num_layers})
  dev = jax.devices()[0]
  print(f"device {dev.device_kind} | jax {jax.__version__} | {FLAGS.config} x {FLAGS.layers} layers", flush=True)
  tok = tokenizer_for(cfg)
  if tok.vocab_size < cfg.vocab_size:   # a random model would sample ids the tokenizer cannot spell
    print(f"vocabulary {cfg.vocab_size} -> the tokenizer's {tok.vocab_size}")
    cfg = cfg.replace(vocab_size=tok.vocab_size)
  host = host_masks(tok, cfg)
  print("host masks: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in host.items()),
        flush=True)

  batches = [int(b) for b in FLAGS.batches]
  # A prompt per row: identical rows would route to the same experts, and a guided row among
  # them would add its own (more weight bytes, not the guide's cost).
  texts = [render_chat([{"role": "user", "content": f"weather in city {i}?"}], "a13b", tools=TOOLS,
                       enable_thinking=False) for i in range(max(int(b) for b in FLAGS.batches))]
  prompts = [tok.encode(t) for t in texts]
  prompt_text = texts[0]
  grammar = structured.chat_grammar("a13b", prompt_text, tools=TOOLS, tool_choice=NAMED)
  params = random_params(cfg, None, 0)
  eng = Engine(cfg, params, max_slots=max(batches), max_len=max(map(len, prompts)) + FLAGS.output_len + 16,
               prefill_chunk=512, tokenizer=tok)
  rows = []
  g = structured.Builder()
  free = structured.Grammar(g, g.until("\x00\x01"))   # never completes, allows every token
  for b in batches:
    runs = [("-", 0, None)] + [(name, k, gr) for name, gr in (("free", free), ("tool", grammar))
                               for k in sorted({1, b})]
    for name, guided, gr in runs:
      tokens_per_s(eng, prompts, b, guided, gr)   # compile and warm the masks
      tps, n = tokens_per_s(eng, prompts, b, guided, gr)
      rows.append(dict(batch=b, grammar=name, guided=guided, tokens_per_s=tps, tokens=n))
      print(f"batch {b} {name} guided {guided}: {tps:.1f} tok/s ({n} tokens)", flush=True)
  print("\n| batch | grammar | guided rows | tok/s | vs unguided |\n|---|---|---|---|---|")
  base = {r["batch"]: r["tokens_per_s"] for r in rows if r["guided"] == 0}
  for r in rows:
    print(f"| {r['batch']} | {r['grammar']} | {r['guided']} | {r['tokens_per_s']:.1f} | "
          f"{r['tokens_per_s'] / base[r['batch']]:.0%} |")
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(dict(device=dev.device_kind, jax=jax.__version__, host=host, runs=rows), f, indent=1)


if __name__ == "__main__":
  app.run(main)

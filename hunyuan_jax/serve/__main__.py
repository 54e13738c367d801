"""python -m hunyuan_jax.serve: the OpenAI-compatible server.

  python -m hunyuan_jax.serve --model=/path/to/Hunyuan-A13B-Instruct --tensor=2 --max_slots=32
  python -m hunyuan_jax.serve --random_weights --config=tiny --port=8000      # smoke test, byte tokenizer
"""
from __future__ import annotations

from absl import app, flags

from hunyuan_jax.serve.model_flags import define_model_flags, load_from_flags

FLAGS = flags.FLAGS
define_model_flags()
flags.DEFINE_string("host", "127.0.0.1", "bind address (0.0.0.0 exposes the server to the network)")
flags.DEFINE_integer("port", 8000, "port")
flags.DEFINE_string("served_model_name", None, "model id reported by /v1/models (default: folder or preset name)")
flags.DEFINE_string("api_key", None, "require 'Authorization: Bearer <key>' on /v1/*")
flags.DEFINE_integer("max_slots", 8, "concurrent sequences in the decode batch")
flags.DEFINE_integer("prefill_chunk", 512, "prompt tokens per prefill call")
flags.DEFINE_integer("kv_block", 256, "without the decode-attention kernel (non-Hopper), attention reads the cache prefix rounded up to this many rows")
flags.DEFINE_bool("enable_prefix_caching", True,
                  "a new request reuses the cached rows of the longest shared prompt prefix (a conversation's "
                  "earlier turns, a common system prompt); usage.prompt_tokens_details.cached_tokens counts them")
flags.DEFINE_bool("precompile", False,
                  "compile every prefill and decode program before serving (takes a while at start) instead of the "
                  "first time a mix of requests meets one (a stall of seconds for every live request)")
flags.DEFINE_bool("enable_thinking", True, "default chat_template_kwargs.enable_thinking")
flags.DEFINE_string("default_chat_template_kwargs", None,
                    "default chat_template_kwargs as a JSON object (vLLM's flag), e.g. "
                    "'{\"reasoning_effort\": \"low\"}'; a request's own chat_template_kwargs win")
flags.DEFINE_bool("use_generation_config", True, "apply the model's generation_config.json sampling defaults")
flags.DEFINE_bool("quiet", False, "no per-request log lines")


def run(argv=None):
  del argv
  import os
  import time

  from hunyuan_jax.serve.engine import cache_bytes
  from hunyuan_jax.serve.loader import build_engine, chat_family_for
  from hunyuan_jax.serve.openai_api import chat_defaults_from
  from hunyuan_jax.serve.sampling import SamplingParams
  from hunyuan_jax.serve.server import ServeContext, Server

  try:
    chat_defaults = chat_defaults_from(FLAGS.default_chat_template_kwargs, FLAGS.enable_thinking)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  mesh, cfg, params, tok = load_from_flags()
  engine, defaults = build_engine(cfg, params, tok, model_dir=FLAGS.model if FLAGS.use_generation_config else None,
                                  max_slots=FLAGS.max_slots, max_len=FLAGS.max_len,
                                  prefill_chunk=FLAGS.prefill_chunk, kv_block=FLAGS.kv_block, mesh=mesh,
                                  prefix_caching=FLAGS.enable_prefix_caching)
  if FLAGS.precompile:   # for requests sampled as the defaults say, and for plain ones
    t = time.perf_counter()
    n = engine.precompile([SamplingParams(**defaults)] + ([SamplingParams()] if defaults else []))
    print(f"precompiled {n} programs in {time.perf_counter() - t:.0f} s", flush=True)
  name = FLAGS.served_model_name or os.path.basename(os.path.normpath(FLAGS.model or FLAGS.config))
  ctx = ServeContext(engine, tok, name, chat_family_for(cfg, tok), defaults,
                     chat_defaults, FLAGS.api_key, FLAGS.quiet)
  server = Server(ctx, FLAGS.host, FLAGS.port)
  print(f"serving {name!r} at {server.url} ({FLAGS.max_slots} slots x {engine.max_len} tokens, "
        f"KV cache {cache_bytes(engine.cache) / 2**30:.2f} GiB, sampling defaults {defaults})", flush=True)
  server.serve_forever()


def main():
  app.run(run)


if __name__ == "__main__":
  main()

"""python -m hunyuan_jax.generate: one prompt, or an interactive chat, streamed to the terminal.

  python -m hunyuan_jax.generate --model=/path/to/Hunyuan-A13B-Instruct --prompt="Why is the sky blue?"
  python -m hunyuan_jax.generate --model=/path/to/Hunyuan-A13B-Instruct          # chat; /exit to quit
  python -m hunyuan_jax.generate --random_weights --config=tiny --raw --prompt="abc" --max_tokens=20

Reasoning (inside <think>) is printed dimmed, the answer plainly; --raw skips the chat template.
"""
from __future__ import annotations

import sys

from absl import app, flags

from hunyuan_jax.serve.model_flags import define_model_flags, load_from_flags

FLAGS = flags.FLAGS
define_model_flags()
flags.DEFINE_string("prompt", None, "generate for this prompt and exit (default: interactive chat)")
flags.DEFINE_bool("raw", False, "feed the prompt as plain text, without the chat template")
flags.DEFINE_string("system", None, "system message for chat")
flags.DEFINE_bool("enable_thinking", True, "chat template enable_thinking")
flags.DEFINE_string("reasoning_effort", None, "Hy3: no_think, low or high")
flags.DEFINE_integer("max_tokens", 512, "tokens to generate per turn")
flags.DEFINE_float("temperature", None, "default: generation_config.json, else 1.0; 0 = greedy")
flags.DEFINE_float("top_p", None, "nucleus mass")
flags.DEFINE_integer("top_k", None, "top-k (0 = off)")
flags.DEFINE_float("repetition_penalty", None, "repetition penalty (1 = off)")
flags.DEFINE_integer("seed", None, "sampling seed")

DIM, RESET = "\033[2m", "\033[0m"


def _sampling(defaults: dict):
  from hunyuan_jax.serve.sampling import SamplingParams
  kw = dict(defaults)
  for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
    if getattr(FLAGS, name) is not None:
      kw[name] = getattr(FLAGS, name)
  return SamplingParams(max_tokens=FLAGS.max_tokens, **kw)


def stream_turn(engine, ids, params, family, raw: bool, out=sys.stdout) -> str:
  """Runs the engine until this request ends, printing as it goes; returns the full model text."""
  from hunyuan_jax.chat import StreamParser
  req = engine.submit(ids, params)
  parser = None if raw else StreamParser(family)
  dim = out.isatty()

  def show(deltas):
    for d in deltas:
      if "reasoning" in d:
        out.write(f"{DIM}{d['reasoning']}{RESET}" if dim else d["reasoning"])
      else:
        out.write(d["content"])
    out.flush()
  while True:
    while req.events.empty():
      engine.step()
    d = req.events.get()
    show([{"content": d.text}] if raw else parser.push(d.text))
    if d.finish_reason:
      if parser is not None:
        show(parser.finish()[0])
      out.write("\n")
      return req.text


def run(argv=None):
  del argv
  from hunyuan_jax.chat import opens_reasoning, render_chat
  from hunyuan_jax.serve.loader import build_engine, chat_family_for
  mesh, cfg, params, tok = load_from_flags()
  engine, defaults = build_engine(cfg, params, tok, model_dir=FLAGS.model, max_slots=1, max_len=FLAGS.max_len,
                                  mesh=mesh)
  family = chat_family_for(cfg, tok)
  params_s = _sampling(defaults)
  chat_kw = dict(enable_thinking=FLAGS.enable_thinking, reasoning_effort=FLAGS.reasoning_effort)
  history = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []

  def turn(user_text: str) -> None:
    if FLAGS.raw:
      stream_turn(engine, tok.encode(user_text), params_s, family, raw=True)
      return
    history.append({"role": "user", "content": user_text})
    prompt = render_chat(history, family, **chat_kw)
    if opens_reasoning(prompt):
      sys.stdout.write("(thinking) ")
    text = stream_turn(engine, tok.encode(prompt), params_s, family, raw=False)
    from hunyuan_jax.chat import parse_output
    answer = parse_output(text, family, in_reasoning=opens_reasoning(prompt)).content
    history.append({"role": "assistant", "content": answer})

  if FLAGS.prompt is not None:
    turn(FLAGS.prompt)
    return
  print("chat: type a message; /exit quits, /reset clears the history", flush=True)
  while True:
    try:
      line = input("> ")
    except EOFError:
      break
    if line.strip() == "/exit":
      break
    if line.strip() == "/reset":
      del history[len([m for m in history if m["role"] == "system"]):]
      continue
    if line.strip():
      turn(line)


def main():
  app.run(run)


if __name__ == "__main__":
  main()

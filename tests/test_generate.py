"""`python -m hunyuan_jax.generate` end to end on the tiny model: one prompt, and the chat loop."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--random_weights", "--config=tiny", "--temperature=0", "--max_tokens=10"]


def _generate(args, tmp_path, stdin=None) -> str:
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run([sys.executable, "-m", "hunyuan_jax.generate", *TINY, *args,
                         f"--compilation_cache_dir={tmp_path / 'jax'}"],
                        input=stdin, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope="module")
def greedy_text():
  """The engine's greedy continuation of a prompt, in this process (the CLI's weights: seed 0)."""
  from hunyuan_jax.serve.loader import build_engine, load_model, load_tokenizer_for
  from hunyuan_jax.serve.sampling import SamplingParams
  cfg, params = load_model(None, "tiny", random_weights=True)
  tok = load_tokenizer_for(None, None, cfg)
  engine, _ = build_engine(cfg, params, tok, max_slots=1, max_len=cfg.max_position_embeddings)

  def text(ids):
    req, = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=10))
    return tok.decode(req.output_ids)
  return tok, text


def test_raw_prompt_streams_the_greedy_continuation(tmp_path, greedy_text):
  tok, text = greedy_text
  out = _generate(["--raw", "--prompt=The sky is"], tmp_path)
  assert out == text(tok.encode("The sky is")) + "\n"


def test_chat_loop_keeps_history_and_reset_clears_it(tmp_path, greedy_text):
  """Two turns, /reset, the first message again, /exit: the second turn's prompt holds the first
  exchange, and after /reset the first reply comes again (the whole transcript is checked)."""
  from hunyuan_jax.chat import parse_output, render_chat
  tok, text = greedy_text
  reply = lambda messages: text(tok.encode(render_chat(messages, "tiny")))
  hello = {"role": "user", "content": "hello"}
  first = reply([hello])
  second = reply([hello, {"role": "assistant", "content": parse_output(first, "tiny").content},
                  {"role": "user", "content": "and then?"}])
  out = _generate([], tmp_path, stdin="hello\nand then?\n/reset\nhello\n/exit\n")
  banner, _, transcript = out.partition("\n")
  assert banner.startswith("chat:")
  # input() writes its "> " prompt to stdout too: one per line read
  assert transcript == f"> {first}\n> {second}\n> > {first}\n> "

"""Training stack on CPU: loss falls, exact resume, NaN stop, data packing and iterator state."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hunyuan_jax.tokenizer import ByteTokenizer
from hunyuan_jax.train import data as data_lib
from hunyuan_jax.train.run_config import load_run_config, split_argv
from hunyuan_jax.train.trainer import NonFiniteLossError, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "train_tiny.json")


def _run(run_dir, **over):
  base = {"run_dir": run_dir, "steps": 24, "batch_size": 4, "seq_len": 64, "log_every": 10,
          "optim.lr": 3e-3, "optim.warmup_steps": 5, "checkpoint.every": 4, "checkpoint.keep": 10}
  base.update(over)
  return load_run_config(TINY, [(k, json.dumps(v)) for k, v in base.items()])


def test_loss_falls_and_resume_is_exact(tmp_path):
  straight = train(_run(str(tmp_path / "a")), log=lambda _: None)["losses"]
  first, last = np.mean([straight[s] for s in (1, 2, 3)]), np.mean([straight[s] for s in (22, 23, 24)])
  assert last < first - 1.0, (first, last)            # 5.6 (uniform over 272) falls below ~3.5

  # Preempted after step 15 (last checkpoint: 12), then resumed to 24 from the run folder.
  part = train(_run(str(tmp_path / "b"), stop_at_step=15), log=lambda _: None)
  assert max(part["losses"]) == 15
  resumed = train(_run(str(tmp_path / "b")), log=lambda _: None)
  assert resumed["start_step"] == 12
  for s in range(13, 25):
    assert resumed["losses"][s] == straight[s], (s, resumed["losses"][s], straight[s])


def test_nonfinite_loss_stops_and_keeps_last_good_state(tmp_path):
  # A negative norm epsilon makes rsqrt(mean(x^2) + eps) NaN at init: step 1 is not finite.
  run = _run(str(tmp_path / "nan"), steps=3, **{"model.rms_norm_eps": -1.0})
  with pytest.raises(NonFiniteLossError, match="not finite"):
    train(run, log=lambda _: None)
  assert os.path.isdir(tmp_path / "nan" / "checkpoints" / "0")


def test_cli_overrides_and_errors():
  rest, path, over = split_argv(["--config=x.json", "--config.optim.lr=0.1", "--mesh.data", "2", "--v=1"])
  assert rest == ["--v=1"] and path == "x.json"
  assert over == [("optim.lr", "0.1"), ("mesh.data", "2")]
  run = load_run_config(TINY, [("optim.lr", "0.1"), ("mesh.data", "2"), ("model.remat_policy", "full")])
  assert run.optim.lr == 0.1 and run.mesh.data == 2 and run.model_config().remat_policy == "full"
  with pytest.raises(ValueError, match="Did you mean lr"):
    load_run_config(TINY, [("optim.lrr", "1")])
  with pytest.raises(ValueError, match="ModelConfig has no field"):
    load_run_config(TINY, [("model.hiden_size", "1")])


def _corpus(tmp_path, lengths):
  path = tmp_path / "docs.jsonl"
  with open(path, "w") as f:
    for i, n in enumerate(lengths):
      f.write(json.dumps({"text": chr(ord("a") + i) * n}) + "\n")
  return str(path)


def test_packing_segments_positions_and_loss_mask(tmp_path):
  tok = ByteTokenizer()
  eos = tok.eos_ids[0]
  it = data_lib.PackedBatches([_corpus(tmp_path, [3, 5, 20])], tok, batch_size=2, seq_len=8)
  b = next(it)
  # Row 0 holds 9 tokens: "aaa<eos>" (seg 1), "bbbbb" (seg 2, continues in row 1).
  row = [97, 97, 97, eos, 98, 98, 98, 98, 98]
  np.testing.assert_array_equal(b["inputs"][0], row[:-1])
  np.testing.assert_array_equal(b["targets"][0], row[1:])
  np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 0, 1, 2, 3])
  # The target of the last token of a document (the next document's first) is not trained on.
  np.testing.assert_array_equal(b["loss_mask"][0], [1, 1, 1, 0, 1, 1, 1, 1])
  # Row 1: the rest of "b..." + eos, then "c"s.
  np.testing.assert_array_equal(b["inputs"][1][:2], [eos, 99])
  np.testing.assert_array_equal(b["segment_ids"][1], [1, 2, 2, 2, 2, 2, 2, 2])
  np.testing.assert_array_equal(b["positions"][1], [0, 0, 1, 2, 3, 4, 5, 6])


def test_iterator_state_restore_reproduces_next_batch(tmp_path):
  files = [_corpus(tmp_path, [7, 30, 2, 50, 11, 9] * 3)]
  tok = ByteTokenizer()
  it = data_lib.PackedBatches(files, tok, batch_size=3, seq_len=16, seed=1)
  for _ in range(8):          # runs past the end of the corpus: a new epoch starts
    next(it)
  state = json.loads(json.dumps(it.get_state()))   # the checkpoint stores it as JSON
  expected = [next(it) for _ in range(3)]
  fresh = data_lib.PackedBatches(files, tok, batch_size=3, seq_len=16, seed=1)
  fresh.restore(state)
  for want in expected:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert state["epoch"] >= 1


def test_default_corpus_is_the_stdlib():
  files = data_lib.resolve_files(None)
  assert len(files) > 100 and all(f.endswith(".py") for f in files)


def test_linear_cross_entropy_matches_the_plain_loss():
  """Fused head + CE (padded vocab, token chunks, grads formed in the forward) == plain jnp."""
  from hunyuan_jax.train.cross_entropy import linear_cross_entropy
  rng = np.random.default_rng(0)
  t, d, v = 10, 16, 300                      # V not a multiple of 128, T not of the chunk
  h = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((v, d)) * 0.3, jnp.float32)   # vocabulary-major
  tgt = jnp.asarray(rng.integers(0, v, t), jnp.int32)
  wt = jnp.asarray(rng.integers(0, 2, t), jnp.float32)

  def plain(h, w):
    logits = h @ w.T
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tgt[:, None], -1)[:, 0]
    return jnp.sum(nll * wt)
  fused = lambda h, w: 0.5 * linear_cross_entropy(h, w, tgt, wt, 4)
  np.testing.assert_allclose(fused(h, w), 0.5 * plain(h, w), rtol=1e-6)
  for a, b in zip(jax.grad(fused, (0, 1))(h, w), jax.grad(lambda h, w: 0.5 * plain(h, w), (0, 1))(h, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  big = 40.0 * h                             # logits spread over hundreds: the lse's scaling
  np.testing.assert_allclose(linear_cross_entropy(big, w, tgt, wt, 4), plain(big, w), rtol=1e-6)
  h16, w16 = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)   # bf16: fp32 logits, bf16 grads
  np.testing.assert_allclose(linear_cross_entropy(h16, w16, tgt, wt), plain(h16.astype(jnp.float32),
                             w16.astype(jnp.float32)), rtol=1e-5)
  g16 = jax.grad(lambda h, w: linear_cross_entropy(h, w, tgt, wt), (0, 1))(h16, w16)
  g32 = jax.grad(plain, (0, 1))(h16.astype(jnp.float32), w16.astype(jnp.float32))
  for a, b in zip(g16, g32):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.02, atol=0.02)


def test_every_train_preset_loads():
  import glob
  paths = glob.glob(os.path.join(ROOT, "configs", "train_*.json"))
  assert len(paths) >= 2
  for path in paths:
    run = load_run_config(path, [])
    assert run.batch_size % run.grad_accum == 0, path

"""Engine: cached decode == uncached forward, continuous batching == alone, stops, slots, CLA cache.

One tiny fp32 model and one engine shared by the module (compiles dominate the runtime on CPU):
max_len 128 with kv_block 64 gives two attention buckets, so both the sliced-prefix and the
full-cache decode paths run.
"""
import dataclasses
import functools
import os
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hunyuan_jax.config import ModelConfig
from hunyuan_jax.model import forward, init_cache, init_params
from hunyuan_jax.serve.engine import Engine, cache_bytes, generation_defaults
from hunyuan_jax.serve.sampling import SamplingParams
from hunyuan_jax.tokenizer import ByteTokenizer

MAX_LEN = 128
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def fp32_dots():
  """fp32 comparisons at 2e-5: GPUs default to TF32 for f32 dots (a logprob then moves 1.6e-4)."""
  before = jax.config.jax_default_matmul_precision
  jax.config.update("jax_default_matmul_precision", "highest")
  yield
  jax.config.update("jax_default_matmul_precision", before)


@pytest.fixture(scope="module")
def model():
  cfg = ModelConfig.from_pretrained("tiny").replace(dtype="float32", param_dtype="float32")
  return cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def engine(model):
  cfg, params = model
  return Engine(cfg, params, max_slots=3, max_len=MAX_LEN, prefill_chunk=16, kv_block=64,
                tokenizer=ByteTokenizer())


@pytest.fixture(scope="module")
def uncached_logits(model):
  """Full (no cache) forward at one padded length: causal, so the padding never reaches a prefix."""
  cfg, params = model
  fn = jax.jit(lambda t: forward(params, t, jnp.arange(MAX_LEN)[None], cfg=cfg).logits[0])

  def logits(ids):
    toks = np.zeros((1, MAX_LEN), np.int32)
    toks[0, :len(ids)] = ids
    return np.asarray(fn(toks))[:len(ids)]
  return logits


def _greedy_alone(uncached_logits, prompt, n):
  ids = list(prompt)
  for _ in range(n):
    ids.append(int(np.argmax(uncached_logits(ids)[-1])))
  return ids[len(prompt):]


def _prompts(seed, lengths):
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(0, 256, n)] for n in lengths]


def test_cached_logits_equal_uncached(model, uncached_logits):
  """Chunked prefill + decode with the cache reproduce the uncached logits at every position."""
  cfg, params = model
  ids = _prompts(1, [35])[0]
  cache = init_cache(cfg, 1, MAX_LEN)
  step = jax.jit(lambda c, t, p: forward(params, t, p, c, cfg=cfg))
  got = []
  for lo, hi in ((0, 16), (16, 32), (32, 33), (33, 34), (34, 35)):  # two prefill chunks, three decode steps
    out = step(cache, jnp.asarray([ids[lo:hi]]), jnp.arange(lo, hi)[None])
    cache = out.cache
    got.append(np.asarray(out.logits[0]))
  np.testing.assert_allclose(np.concatenate(got), uncached_logits(ids), atol=2e-5, rtol=1e-5)


def _log_softmax(x):
  x = x.astype(np.float64)
  return x - (np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) + x.max(-1, keepdims=True))


def test_logprobs_match_the_uncached_distribution(engine, uncached_logits):
  """Generated and prompt tokens' logprobs (and their top alternatives) are the log-softmax of the
  uncached logits, across prefill chunks, next to a request that asks for none."""
  prompt = _prompts(7, [37])[0]   # 3 prefill chunks of 16
  ask = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=2)
  r = engine.submit(prompt, ask)
  plain = engine.submit(_prompts(8, [5])[0], GREEDY)
  while not (r.done and plain.done):
    engine.step()
  assert plain.logprobs == [] and plain.prompt_logprobs == []
  ids = prompt + r.output_ids
  ref = _log_softmax(uncached_logits(ids))          # row j predicts ids[j + 1]
  assert len(r.logprobs) == 5 and len(r.prompt_logprobs) == len(prompt) and r.prompt_logprobs[0] is None
  for entries, first, width in ((r.prompt_logprobs[1:], 1, 2), (r.logprobs, len(prompt), 3)):
    for j, e in enumerate(entries):
      pos = first + j
      assert e.token_id == ids[pos]
      np.testing.assert_allclose(e.logprob, ref[pos - 1, ids[pos]], atol=2e-5)
      top = np.argsort(-ref[pos - 1], kind="stable")[:width]
      assert [t for t, _ in e.top] == top.tolist()
      np.testing.assert_allclose([lp for _, lp in e.top], ref[pos - 1, top], atol=2e-5)
  # greedy: each generated token is its position's most likely one
  assert all(e.top[0][0] == e.token_id for e in r.logprobs)
  assert all(len(e.top) == 0 for e in engine.generate([prompt], SamplingParams(
      temperature=0.0, max_tokens=2, ignore_eos=True, logprobs=0))[0].logprobs)


def test_engine_greedy_matches_uncached_and_batching(engine, uncached_logits):
  """Requests joining at different steps (a slot reused, one crossing a kv bucket) each get their
  alone-greedy tokens."""
  prompts = _prompts(2, [5, 40, 17, 50, 3])
  n_new = [8, 8, 8, 20, 8]                               # 50 + 20 crosses the 64-row bucket
  expected = [_greedy_alone(uncached_logits, p, n) for p, n in zip(prompts, n_new)]
  reqs = []
  for k, (p, n) in enumerate(zip(prompts, n_new)):
    reqs.append(engine.submit(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)))
    for _ in range(k + 1):                                # arrivals at different steps
      engine.step()
  while not all(r.done for r in reqs):
    engine.step()
  assert [r.output_ids for r in reqs] == expected
  assert all(r.finish_reason == "length" for r in reqs)
  assert engine.num_active() == 0


def test_seeded_sampling_reproducible_in_any_batch(engine):
  p = _prompts(3, [9])[0]
  sp = lambda seed: SamplingParams(temperature=1.0, top_p=0.95, max_tokens=6, seed=seed, ignore_eos=True)
  alone = engine.generate([p], sp(7))[0].output_ids
  crowd = engine.generate([p, _prompts(4, [12])[0], p], sp(7))
  assert crowd[0].output_ids == alone and crowd[2].output_ids == alone
  others = [engine.generate([p], sp(s))[0].output_ids for s in (8, 9, 10)]
  assert any(o != alone for o in others), "different seeds should not all repeat seed 7's draw"


def test_stop_token_stop_string_and_max_tokens(engine):
  p = _prompts(5, [11])[0]
  free = engine.generate([p], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
  assert len(free.output_ids) == 12 and free.finish_reason == "length"
  # stop token: the first occurrence of the 4th generated id ends the request there
  stop_id = free.output_ids[3]
  cut = free.output_ids.index(stop_id) + 1
  r = engine.generate([p], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_id]))[0]
  assert r.output_ids == free.output_ids[:cut] and r.finish_reason == "stop"
  # stop string: two bytes taken from the middle of the generated text; the text ends before them
  text = ByteTokenizer().decode(free.output_ids)
  stop = text[5:7]
  r = engine.generate([p], SamplingParams(temperature=0.0, max_tokens=12, stop=[stop], ignore_eos=True))[0]
  assert r.finish_reason == "stop" and r.text == text[:text.find(stop)]
  # the streamed deltas never contain any part of the stop string and add up to the final text
  deltas = []
  while not r.events.empty():
    deltas.append(r.events.get())
  assert "".join(d.text for d in deltas) == r.text and deltas[-1].finish_reason == "stop"
  kept = engine.generate([p], SamplingParams(temperature=0.0, max_tokens=12, stop=[stop], ignore_eos=True,
                                             include_stop_str_in_output=True))[0]
  assert kept.text == text[:text.find(stop) + len(stop)] and kept.finish_reason == "stop"


def test_min_tokens_and_logit_bias(engine):
  """An EOS pushed up by +100 is held back for exactly min_tokens tokens (which are then the greedy
  ones), stop strings do not end the reply before min_tokens, and a bias stays in its own row."""
  p, other = _prompts(12, [10, 13])
  free, free_other = engine.generate([p, other], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
  eos = ByteTokenizer().eos_ids[0]
  assert eos not in free.output_ids
  pushed = SamplingParams(temperature=0.0, max_tokens=12, logit_bias={eos: 100.0}, min_tokens=5)
  r, beside = engine.generate([p, other], [pushed, GREEDY])
  assert r.output_ids == free.output_ids[:5] + [eos] and r.finish_reason == "stop"
  assert beside.output_ids == free_other.output_ids[:8]
  banned = engine.generate([p], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                               logit_bias={free.output_ids[0]: -100.0}))[0]
  assert banned.output_ids[0] != free.output_ids[0]
  text = ByteTokenizer().decode(free.output_ids)
  stop = text[1:3]
  late = engine.generate([p], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop],
                                             min_tokens=6))[0]
  assert late.output_ids[:6] == free.output_ids[:6] and late.text.find(stop) == text.find(stop)
  with pytest.raises(ValueError, match="logit_bias"):
    engine.submit(p, SamplingParams(logit_bias={10**6: 1.0}))


def test_prefix_cache_reuses_a_finished_turn(engine, uncached_logits):
  """A prompt that extends a finished request's prompt and output starts from that slot's rows:
  only the new tokens are prefilled, the tokens are the uncached ones, and the repetition-penalty
  mask still holds the whole prompt. A prompt_logprobs request computes every row."""
  first = engine.generate([_prompts(13, [30])[0]], GREEDY)[0]
  follow = first.prompt_ids + first.output_ids + _prompts(14, [6])[0]
  r = engine.generate([follow], GREEDY)[0]
  assert r.cached == 30 + 8 - 1                        # the last output was never fed back
  assert r.slot == first.slot
  assert r.output_ids == _greedy_alone(uncached_logits, follow, 8)
  in_prompt = np.zeros(engine.cfg.vocab_size, bool)
  in_prompt[follow] = True
  np.testing.assert_array_equal(np.asarray(engine.state.prompt_bv[r.slot]), in_prompt)
  again = engine.generate([follow], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True,
                                                    prompt_logprobs=1))[0]
  assert again.cached == 0 and len(again.prompt_logprobs) == len(follow)
  assert again.output_ids == r.output_ids[:2]


def test_prefix_cache_copies_a_busy_slots_rows(engine, uncached_logits):
  """A prompt sharing a prefix with a request still decoding gets a copy of its rows in another
  slot; neither request's tokens change."""
  long_p = _prompts(15, [40])[0]
  shared = long_p[:24] + _prompts(16, [9])[0]
  a = engine.submit(long_p, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
  while len(a.output_ids) < 3:
    engine.step()
  b = engine.submit(shared, GREEDY)
  while not (a.done and b.done):
    engine.step()
  assert b.cached == 24 and b.slot != a.slot
  assert b.output_ids == _greedy_alone(uncached_logits, shared, 8)
  assert a.output_ids == _greedy_alone(uncached_logits, long_p, 30)


def test_copies_of_one_prompt_are_prefilled_once(engine, uncached_logits):
  """n choices of one prompt (or a burst sharing a system prompt): the first is prefilled, the
  others wait for its rows and copy them; a shorter shared prefix waits too."""
  p = _prompts(18, [40])[0]
  sibling = p[:30] + _prompts(19, [4])[0]
  reqs = engine.generate([p, p, sibling], GREEDY)
  assert [r.cached for r in reqs] == [0, 39, 30]
  assert len({r.slot for r in reqs}) == 3
  assert reqs[0].output_ids == reqs[1].output_ids == _greedy_alone(uncached_logits, p, 8)
  assert reqs[2].output_ids == _greedy_alone(uncached_logits, sibling, 8)


def test_short_chunks_of_several_slots_prefill_in_one_call(model, uncached_logits):
  """Chunks of one length bucket run as one call of up to prefill_chunk tokens; each request
  still gets its alone tokens (greedy, and a seeded draw), its own first-token logprobs, and a
  prompt-logprob request runs alone."""
  cfg, params = model
  eng = Engine(cfg, params, max_slots=4, max_len=MAX_LEN, prefill_chunk=64, kv_block=64)
  calls = []
  prefill = eng._prefill
  eng._prefill = lambda *a, **k: calls.append(a[5].shape) or prefill(*a, **k)   # slots_p, padded
  prompts = _prompts(20, [9, 14, 5, 40])      # buckets 16, 16, 16 and 64
  greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
  reqs = eng.generate(prompts, greedy)
  assert sorted(calls) == [(1,), (4,)]        # three 16-token rows (padded to 4) in one call
  for r, p in zip(reqs, prompts):
    assert r.output_ids == _greedy_alone(uncached_logits, p, 6)
    lp = np.asarray(jax.nn.log_softmax(uncached_logits(p)[-1]))
    assert abs(r.logprobs[0].logprob - lp[r.output_ids[0]]) < 2e-5
  seeded = SamplingParams(temperature=1.0, max_tokens=4, seed=3, ignore_eos=True)
  alone = [eng.generate([p], seeded)[0].output_ids for p in prompts[:3]]
  calls.clear()
  together = [r.output_ids for r in eng.generate(prompts[:3], [seeded] * 3)]
  assert together == alone and len(calls) == 1
  calls.clear()
  echo = dataclasses.replace(greedy, prompt_logprobs=1)
  mixed = eng.generate(prompts[:2], [echo, greedy])
  assert sorted(calls) == [(1,), (1,)] and len(mixed[0].prompt_logprobs) == len(prompts[0])


def test_precompile_leaves_nothing_to_compile(model, uncached_logits):
  """After precompile, a mix of requests (lengths, arrivals, prefix reuse, copies, batched
  prefill) runs without compiling, and gets the uncached tokens."""
  cfg, params = model
  eng = Engine(cfg, params, max_slots=4, max_len=MAX_LEN, prefill_chunk=64, kv_block=64)
  assert eng.precompile() == 8 + 2 + 4          # prefill (chunk, rows, cache rows), decode buckets, copies
  programs = lambda: [f._cache_size() for f in (eng._prefill, eng._decode, eng._copy_rows)]
  compiled = programs()
  prompts = _prompts(21, [3, 20, 70, 9, 33])
  prompts.append(prompts[2][:40] + _prompts(22, [5])[0])   # shares 40 tokens with a longer prompt
  reqs = [eng.submit(p, GREEDY) for p in prompts[:4]]
  eng.step()
  reqs += [eng.submit(p, GREEDY) for p in prompts[4:]]
  while not all(r.done for r in reqs):
    eng.step()
  assert programs() == compiled
  assert [r.output_ids for r in reqs] == [_greedy_alone(uncached_logits, p, 8) for p in prompts]
  assert reqs[-1].cached == 40


def test_precompile_skips_row_counts_beyond_the_slots(model):
  """One slot never batches prefill rows: its precompile leaves out the 4-row programs (c = 16:
  one per cache-row bucket: 64 and 128), and a 77-token prompt (chunks of 64 and 13) compiles
  nothing new."""
  cfg, params = model
  eng = Engine(cfg, params, max_slots=1, max_len=MAX_LEN, prefill_chunk=64, kv_block=64)
  assert eng._prefill_row_counts(16) == [1] and eng._rows_per_call(16) == 4
  assert eng.precompile() == 8 - 2 + 2 + 4   # 4 slots: 8 prefill programs, 2 of them 4-row
  compiled = [f._cache_size() for f in (eng._prefill, eng._decode, eng._copy_rows)]
  req, = eng.generate([_prompts(23, [77])[0]], GREEDY)
  assert len(req.output_ids) == GREEDY.max_tokens
  assert [f._cache_size() for f in (eng._prefill, eng._decode, eng._copy_rows)] == compiled


def test_common_prefix_across_slice_boundaries():
  from hunyuan_jax.serve.prefix_cache import common_prefix
  rng = np.random.default_rng(0)
  for _ in range(300):
    a = rng.integers(0, 3, rng.integers(0, 3000)).tolist()
    m = int(rng.integers(0, len(a) + 1))
    b = a[:m] + rng.integers(0, 3, rng.integers(0, 400)).tolist()
    naive = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert common_prefix(a, b) == naive


def test_prefix_caching_off_prefills_every_token(model):
  cfg, params = model
  eng = Engine(cfg, params, max_slots=1, max_len=MAX_LEN, prefill_chunk=16, kv_block=64, prefix_caching=False)
  p = _prompts(17, [20])[0]
  one, two = (eng.generate([p], GREEDY)[0] for _ in range(2))
  assert one.cached == two.cached == 0 and one.output_ids == two.output_ids


def test_cancel_frees_slot_and_bad_prompts_raise(engine):
  p = _prompts(6, [7])[0]
  r = engine.submit(p, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
  engine.step()
  engine.step()
  assert engine.num_active() == 1
  engine.cancel(r)
  engine.step()
  assert r.finish_reason == "abort" and engine.num_active() == 0
  with pytest.raises(ValueError, match="context holds 128"):
    engine.submit([1] * MAX_LEN)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    engine.submit([1, 999])
  with pytest.raises(ValueError, match="temperature"):
    engine.submit([1], SamplingParams(temperature=-1.0))


def test_a_vocabulary_padded_past_the_tokenizer_never_yields_its_padding():
  """Hunyuan-Large pads 128166 tokens to 129024 rows; the padded rows' ids have no text."""
  cfg = ModelConfig.from_pretrained("tiny").replace(dtype="float32", param_dtype="float32", vocab_size=512)
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(3))
  sp = SamplingParams(temperature=5.0, max_tokens=40, seed=0, ignore_eos=True, logprobs=20)
  runs = {}
  for tok in (ByteTokenizer(), None):   # without a tokenizer nothing says where the text ends
    eng = Engine(cfg, params, max_slots=2, max_len=MAX_LEN, prefill_chunk=16, kv_block=64, tokenizer=tok)
    reqs = eng.generate(_prompts(5, [7, 9]), sp)
    runs[tok is None] = [t for r in reqs for t in r.output_ids] + [i for r in reqs for e in r.logprobs for i, _ in e.top]
  assert len(runs[False]) == 80 + 80 * 20 and max(runs[False]) < ByteTokenizer().vocab_size
  assert max(runs[True]) >= ByteTokenizer().vocab_size


def test_cla_halves_the_cache():
  cfg = ModelConfig.from_pretrained("tiny")
  full = cache_bytes(init_cache(cfg, 4, 256))
  cla = cache_bytes(init_cache(cfg.replace(cla_share_factor=2), 4, 256))
  assert cla * 2 == full
  # 4 layers x (K, V) x 4 slots x 256 rows x 2 kv heads x 32 dims x 2 bytes
  assert full == 4 * 2 * 4 * 256 * cfg.num_kv_heads * cfg.head_dim * 2


def test_generation_config_defaults(tmp_path):
  (tmp_path / "generation_config.json").write_text(json.dumps(
      {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "eos_token_id": [1, 2]}))
  assert generation_defaults(str(tmp_path)) == {"temperature": 0.7, "top_k": 20, "top_p": 0.8,
                                                "repetition_penalty": 1.05}
  assert generation_defaults(None) == {}


MESH_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"   # simulated CPU devices, also on a machine with one GPU
import json, jax
from hunyuan_jax.serve.engine import Engine
from hunyuan_jax.serve.loader import load_model, make_mesh_for_serving
from hunyuan_jax.serve.sampling import SamplingParams
from hunyuan_jax.model import moe_parallel
sharded_moe_calls = []
_sharded = moe_parallel.moe_ffn_sharded
moe_parallel.moe_ffn_sharded = lambda *a, **k: (sharded_moe_calls.append(1), _sharded(*a, **k))[1]
cfg, params = load_model(None, "tiny", random_weights=True, dtype="float32")
mesh = make_mesh_for_serving(tensor=2, expert=2)
_, sharded = load_model(None, "tiny", random_weights=True, dtype="float32", mesh=mesh)
g = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
prompts = [[1, 2, 3, 4, 5], list(range(40, 60))]
kw = dict(max_slots=4, max_len=64, prefill_chunk=16, kv_block=64)
# then a next turn (a free slot's rows) beside a prompt sharing 18 tokens with it (a copy across slots)
follow = [prompts[1] + [7, 8], prompts[1][:18] + [9, 9, 9]]
runs = {}
for name, eng in (("one", Engine(cfg, params, **kw)), ("many", Engine(cfg, sharded, mesh=mesh, **kw))):
  runs[name] = [r.output_ids for r in eng.generate(prompts, g)]
  compiles = [f._cache_size() for f in (eng._prefill, eng._decode, eng._set_rows)]
  reqs = eng.generate(follow, g)
  runs[name] += [r.output_ids for r in reqs]
  runs[name + "_cached"] = [r.cached for r in reqs]
# fp8 experts (quant.fp8), drawn quantized layer by layer, on one device and sharded
_, q_one = load_model(None, "tiny", random_weights=True, dtype="float32", quantization="fp8")
_, q_many = load_model(None, "tiny", random_weights=True, dtype="float32", mesh=mesh, quantization="fp8")
moe = q_many["groups_0"]["layer_0"]["moe"]
for name, eng in (("fp8_one", Engine(cfg, q_one, **kw)), ("fp8_many", Engine(cfg, q_many, mesh=mesh, **kw))):
  runs[name] = [r.output_ids for r in eng.generate(prompts, g)]
print(json.dumps({**runs, "cache_spec": str(jax.tree.leaves(eng.cache)[0].sharding.spec),
                  "fp8_specs": [list(moe[k].sharding.spec) + [None] * (moe[k].ndim - len(moe[k].sharding.spec))
                                for k in ("wi_fp8", "wi_scale", "wo_fp8", "wo_scale")],
                  "qkv_spec": list(eng.params["groups_0"]["layer_0"]["attn"]["qkv"].sharding.spec),
                  "sharded_moe_calls": len(sharded_moe_calls),
                  "compiles": compiles}))
"""


def test_sharded_engine_matches_single_device():
  """Tensor x expert x data mesh on 8 simulated CPU devices (own process: the device count is fixed at start)."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], capture_output=True, text=True, env=env,
                        timeout=600, cwd=root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["one"] == out["many"] and out["one_cached"] == out["many_cached"] == [20, 18]
  assert out["fp8_one"] == out["fp8_many"]
  # [L, E, 2, F, H], [L, E, 2, F], [L, E, H, F], [L, E, H]: experts over `expert`, F over `tensor`
  assert out["fp8_specs"] == [[None, "expert", None, "tensor", None], [None, "expert", None, "tensor"],
                              [None, "expert", None, "tensor"], [None, "expert", None]]
  assert "tensor" in out["cache_spec"] and "data" in out["cache_spec"]   # kv heads and slots are sharded
  assert out["qkv_spec"] == [None, None, "tensor"]   # fused q/k/v [L, H, S, G, D]: blocks per shard
  # prefill and decode trace the MoE per shard (its kernels see local experts), not through GSPMD
  assert out["sharded_moe_calls"] > 0
  # two prompts, one chunk bucket: outputs fed back keep their input shardings, so nothing recompiles
  assert out["compiles"] == [1, 1, 1]


def test_xla_flags_keep_the_users_values(monkeypatch):
  from hunyuan_jax.xla_flags import (DECODE_GPU_FLAGS, TRAIN_GPU_FLAGS, use_decode_xla_flags,
                                     use_train_xla_flags)
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/x")
  use_decode_xla_flags()
  flags = os.environ["XLA_FLAGS"].split()
  assert "--xla_gpu_enable_triton_gemm=true" in flags and "--xla_dump_to=/tmp/x" in flags
  n = 2 + len(DECODE_GPU_FLAGS) - 1           # the user's triton flag replaces ours
  assert {f for f in DECODE_GPU_FLAGS if "triton" not in f} <= set(flags) and len(flags) == n
  use_decode_xla_flags()
  assert len(os.environ["XLA_FLAGS"].split()) == n
  use_train_xla_flags()
  assert os.environ["XLA_FLAGS"].split()[n:] == list(TRAIN_GPU_FLAGS)


CACHE_SCRIPT = r"""
import sys, time, jax
from absl import flags
from hunyuan_jax.serve.model_flags import define_model_flags, load_from_flags
from hunyuan_jax.serve.loader import build_engine
define_model_flags()
flags.FLAGS(["x", "--random_weights", "--config=tiny", f"--compilation_cache_dir={sys.argv[1]}"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)   # cache even the tiny programs
_, cfg, params, tok = load_from_flags()
eng, _ = build_engine(cfg, params, tok, max_slots=2, max_len=64, prefill_chunk=16)
t = time.perf_counter()
eng.precompile()
print(jax.config.jax_compilation_cache_dir, time.perf_counter() - t)
"""


def test_compilation_cache_dir_is_used_by_the_next_start(tmp_path):
  """serve / generate's --compilation_cache_dir: the first start writes programs there, the
  second reads them (each start in its own process, as a restarted server)."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
  runs = []
  for _ in range(2):
    proc = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, secs = proc.stdout.split()[-2:]
    runs.append((len(os.listdir(tmp_path)), float(secs)))
  assert where == str(tmp_path) and runs[0][0] > 0 and runs[1][0] == runs[0][0]   # all reused
  assert runs[1][1] < runs[0][1]

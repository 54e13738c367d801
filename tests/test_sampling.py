"""Sampling: draws follow the filtered distribution; penalties move what they should; seeds repeat."""
import jax
import numpy as np
import pytest

from hunyuan_jax.serve.sampling import (NEG, SampleOptions, SamplingArrays, SamplingParams, apply_penalties,
                                       sample, sample_options)

LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0], np.float32)
N = 4000
# chi-square critical values at p = 1e-4 by degrees of freedom (draws are seeded: no flakiness,
# the bound only says a correct sampler passes with overwhelming probability for any seed set)
CHI2_1E4 = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74}

_sample = jax.jit(sample)


def _draw(p: SamplingParams, logits=LOGITS, n=N):
  sp = SamplingArrays.from_params([p] * n, [0] * n, list(range(n)))
  v = logits.shape[0]
  toks = _sample(np.tile(logits, (n, 1)), sp, np.zeros((n, v), np.int32), np.zeros((n, v), bool))
  return np.bincount(np.asarray(toks), minlength=v)


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _expected(t=1.0, top_k=0, top_p=1.0, min_p=0.0):
  p = _softmax(LOGITS / t)
  keep = np.ones_like(p, bool)
  if top_k:
    keep &= np.argsort(-p).argsort() < top_k
  q = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
  order = np.argsort(-q)
  before = np.cumsum(q[order]) - q[order]
  nucleus = np.zeros_like(keep)
  nucleus[order] = (before < top_p) | (np.arange(len(q)) == 0)
  keep &= nucleus
  if min_p:
    keep &= p >= min_p * p.max()
  q = np.where(keep, p, 0)
  return q / q.sum()


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(top_k=3), dict(top_p=0.8),
                                dict(min_p=0.3), dict(temperature=1.5, top_k=4, top_p=0.9)],
                         ids=["temperature", "top_k", "top_p", "min_p", "combined"])
def test_draws_match_filtered_distribution(kw):
  t = kw.get("temperature", 1.0)
  want = _expected(t, kw.get("top_k", 0), kw.get("top_p", 1.0), kw.get("min_p", 0.0))
  got = _draw(SamplingParams(**kw))
  assert np.all(got[want == 0] == 0), f"filtered tokens were drawn: {got} vs {want}"
  kept = want > 0
  assert kept.sum() >= 2, "the case must leave something random to test"
  exp = want[kept] * N
  chi2 = float(((got[kept] - exp) ** 2 / exp).sum())
  assert chi2 < CHI2_1E4[int(kept.sum()) - 1], (got, exp, chi2)


def test_top_p_keeps_tokens_until_mass_reached():
  # probs ~ [0.44, 0.27, 0.16, ...]: top_p 0.5 needs exactly the first two tokens
  assert np.nonzero(_expected(top_p=0.5))[0].tolist() == [0, 1]
  got = _draw(SamplingParams(top_p=0.5), n=500)
  assert got[2:].sum() == 0 and got[:2].min() > 0


def _arrays(p: SamplingParams, b=1):
  return SamplingArrays.from_params([p] * b, [0] * b, [0] * b)


def test_penalties():
  logits = np.array([[2.0, 1.9, -1.0, 0.5]], np.float32)
  counts = np.array([[0, 0, 0, 3]], np.int32)
  prompt = np.array([[True, False, True, False]])
  rep = np.asarray(apply_penalties(logits, _arrays(SamplingParams(repetition_penalty=2.0)), counts, prompt))
  np.testing.assert_allclose(rep, [[1.0, 1.9, -2.0, 0.25]])   # seen: positive /2, negative *2
  pres = np.asarray(apply_penalties(logits, _arrays(SamplingParams(presence_penalty=1.0)), counts, prompt))
  np.testing.assert_allclose(pres, [[2.0, 1.9, -1.0, -0.5]])   # generated once or more: -1, prompt untouched
  freq = np.asarray(apply_penalties(logits, _arrays(SamplingParams(frequency_penalty=0.5)), counts, prompt))
  np.testing.assert_allclose(freq, [[2.0, 1.9, -1.0, -1.0]])   # 3 occurrences x 0.5
  # greedy picks the penalised argmax
  tok = _sample(logits, _arrays(SamplingParams(temperature=0.0, repetition_penalty=2.0)), counts, prompt)
  assert int(tok[0]) == 1


def test_greedy_and_sampled_rows_mix_and_seeds_repeat():
  rows = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(temperature=1.0)]
  logits = np.tile(LOGITS, (3, 1))
  z = np.zeros((3, 6), np.int32), np.zeros((3, 6), bool)
  draws = []
  for step in range(40):
    sp = SamplingArrays.from_params(rows, [step] * 3, [11, 5, 11])
    draws.append(np.asarray(_sample(logits, sp, *z)))
  draws = np.stack(draws)
  assert np.all(draws[:, 0] == 0)                      # greedy row: always the argmax
  assert len(set(draws[:, 1].tolist())) > 1            # sampled rows vary with the step
  # seed 5 in row 1 vs seed 11 in row 2 differ; seed 11 reproduces in a different row and batch
  assert not np.array_equal(draws[:, 1], draws[:, 2])
  solo = [int(_sample(logits[:1], SamplingArrays.from_params(rows[2:], [s], [11]), z[0][:1], z[1][:1])[0])
          for s in range(40)]
  assert solo == draws[:, 2].tolist()


def test_top_k_cut_keeps_ties_like_hf():
  """The cut is on the value: a token tied with the k-th is kept (HF's TopKLogitsWarper)."""
  from hunyuan_jax.serve.sampling import filter_logits
  logits = np.array([[3.0, 1.0, 1.0, 0.0, -2.0]], np.float32)
  for top_k, top_p, kept in ((2, 1.0, [1, 1, 1, 0, 0]), (1, 1.0, [1, 0, 0, 0, 0]),
                             (0, 0.5, [1, 0, 0, 0, 0]), (4, 0.99, [1, 1, 1, 1, 0])):
    sp = SamplingArrays.from_params([SamplingParams(top_k=top_k, top_p=top_p)], [0], [0])
    out = np.asarray(filter_logits(logits, sp)) > -1e29
    assert out[0].astype(int).tolist() == kept, (top_k, top_p)


def _sorted_cut_mask(x, k, p):
  """The cuts as a sorted cumulative sum gives them (float64): the semantics the search keeps."""
  xs = np.sort(x.astype(np.float64))[::-1]
  k = min(k, len(x)) if k > 0 else len(x)
  top = xs[:k]
  probs = np.exp(top - top[0]) / np.exp(top - top[0]).sum()
  before = np.cumsum(probs) - probs
  n_keep = int(np.sum((before < p) | (np.arange(k) == 0))) if p < 1 else k
  return x >= top[n_keep - 1]


@pytest.mark.parametrize("rows", [4, 12])   # both pass widths of the radix descent
def test_top_k_top_p_cuts_match_a_sorted_cumulative_sum(rows):
  from hunyuan_jax.serve.sampling import _top_k_top_p_mask
  rng = np.random.default_rng(rows)
  for trial in range(6):
    x = (rng.standard_normal((rows, 3000)) * rng.uniform(0.3, 8)).astype(np.float32)
    if trial % 2:
      x = np.round(x)   # many ties, the k-th value among them; -0.0 and 0.0 are one value
    x[0, :5] = -3e38    # extreme negatives keep their order
    k = rng.choice([0, 1, 7, 20, 400], size=rows).astype(np.int32)
    p = rng.choice([1.0, 0.9, 0.8, 0.3, 0.05], size=rows).astype(np.float32)
    got = np.asarray(jax.jit(_top_k_top_p_mask)(x, k, p))
    for r in range(rows):
      want = _sorted_cut_mask(x[r], int(k[r]), float(p[r]))
      assert np.array_equal(got[r], want), (trial, r, k[r], p[r], got[r].sum(), want.sum())


def test_sort_is_a_static_choice_and_rows_without_filters_draw_the_same():
  """No run-time branch (a GPU conditional waits on the host every step); skipping the sort
  where no row asks for top-k/top-p changes no token, and a row that does not ask is not
  filtered when another row makes the sort run."""
  plain = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, min_p=0.05),
           SamplingParams(temperature=1.3)]
  nucleus = plain + [SamplingParams(temperature=1.0, top_p=0.5)]
  assert not sample_options(plain + [None]).top_k_top_p and sample_options(nucleus).top_k_top_p
  assert sample_options([SamplingParams(top_k=3)]).top_k_top_p
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
  z = np.zeros((4, 50), np.int32), np.zeros((4, 50), bool)
  sort = jax.jit(sample, static_argnums=4)
  for fn_args in ((SampleOptions(True),), (SampleOptions(False),)):
    sp = SamplingArrays.from_params(plain, [0] * 3, [1, 2, 3])
    jaxpr = str(jax.make_jaxpr(sample, static_argnums=4)(logits[:3], sp, z[0][:3], z[1][:3], *fn_args))
    assert " cond[" not in jaxpr and " while[" not in jaxpr
  for step in range(30):
    sp3 = SamplingArrays.from_params(plain, [step] * 3, [1, 2, 3])
    sp4 = SamplingArrays.from_params(nucleus, [step] * 4, [1, 2, 3, 4])
    without = np.asarray(sort(logits[:3], sp3, z[0][:3], z[1][:3], SampleOptions(False)))
    with_sort = np.asarray(sort(logits[:3], sp3, z[0][:3], z[1][:3], SampleOptions(True)))
    mixed = np.asarray(sort(logits, sp4, *z, SampleOptions(True)))
    assert without.tolist() == with_sort.tolist() == mixed[:3].tolist()


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=2.0),
                                dict(top_k=-5), dict(repetition_penalty=0.0), dict(presence_penalty=3.0),
                                dict(frequency_penalty=-2.5), dict(max_tokens=0), dict(logit_bias={3: 101.0}),
                                dict(logit_bias={i: 1.0 for i in range(301)}), dict(min_tokens=-1),
                                dict(min_tokens=9, max_tokens=8)])
def test_validate_rejects_out_of_range(kw):
  name = next(iter(kw))
  with pytest.raises(ValueError, match=name):
    SamplingParams(**kw).validate()


def test_validate_checks_logit_bias_ids_against_the_vocabulary():
  SamplingParams(logit_bias={5: 1.0}).validate(6)
  with pytest.raises(ValueError, match="logit_bias"):
    SamplingParams(logit_bias={6: 1.0}).validate(6)


def _draw_biased(rows, n_each, step=0, eos_ids=()):
  """Draws of each row (n_each times, one seed per draw) under SampleOptions(bias=True)."""
  rows = [r for r in rows for _ in range(n_each)]
  n, v = len(rows), LOGITS.shape[0]
  sp = SamplingArrays.from_params(rows, [step] * n, list(range(n)), eos_ids)
  assert sample_options(rows).bias
  toks = sample(np.tile(LOGITS, (n, 1)), sp, np.zeros((n, v), np.int32), np.zeros((n, v), bool),
                SampleOptions(top_k_top_p=False, bias=True))
  return np.asarray(toks).reshape(-1, n_each)


def test_logit_bias_adds_to_the_logits_and_only_in_its_own_row():
  """The biased row's draws follow softmax(logits + bias) (chi-square at p = 1e-4); the unbiased
  row beside it in the batch follows softmax(logits)."""
  bias = {5: 2.5, 0: -100.0, 2: 0.75}
  draws = _draw_biased([SamplingParams(logit_bias=bias), SamplingParams()], N)
  shifted = LOGITS + np.array([bias.get(i, 0.0) for i in range(len(LOGITS))], np.float32)
  for row, logits in zip(draws, (shifted, LOGITS)):
    counts = np.bincount(row, minlength=len(LOGITS))
    p = _softmax(logits)
    live = p > 1e-9
    assert counts[~live].sum() == 0
    chi2 = (((counts - N * p) ** 2)[live] / (N * p[live])).sum()
    assert chi2 < CHI2_1E4[int(live.sum()) - 1], (counts, N * p)


def test_min_tokens_holds_back_stop_ids_for_the_first_tokens_only():
  """Greedy rows whose argmax is the EOS (id 0): held back while fewer than min_tokens tokens are
  generated, with the request's stop_token_ids; ignore_eos leaves the EOS alone."""
  greedy = dict(temperature=0.0, min_tokens=3)
  rows = [SamplingParams(**greedy), SamplingParams(**greedy, stop_token_ids=[1]),
          SamplingParams(**greedy, ignore_eos=True), SamplingParams(temperature=0.0)]
  for step in range(5):
    got = _draw_biased(rows, 1, step, eos_ids=[0])[:, 0].tolist()
    held = step < 3
    assert got == ([1, 2, 0, 0] if held else [0, 0, 0, 0]), (step, got)


def test_bias_entries_pack_logit_bias_then_min_tokens_stops():
  p = SamplingParams(logit_bias={7: -1.0}, min_tokens=2, stop_token_ids=[9])
  assert p.bias_entries([3]) == [(7, -1.0, 2**32 - 1), (3, NEG, 2), (9, NEG, 2)]
  assert SamplingParams(min_tokens=2, ignore_eos=True).bias_entries([3]) == []
  with pytest.raises(ValueError, match="stop_token_ids"):
    SamplingParams(min_tokens=1, stop_token_ids=list(range(600))).bias_entries([])

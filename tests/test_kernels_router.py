"""kernels_pallas.route: every backend against a numpy oracle and the reference's gradients."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas as kp
from kernels_pallas import _dispatch
from kernels_pallas import RouterSpec

SPECS = [
    RouterSpec(top_k=8, scoring="softmax"),                                    # A13B
    RouterSpec(top_k=1, scoring="softmax", renormalize=False),                 # Large
    RouterSpec(top_k=8, scoring="sigmoid", scale=2.826, eps=1e-20),            # Hy3
]


def oracle(x, w, bias, spec):
  logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  if spec.scoring == "softmax":
    s = np.exp(logits - logits.max(-1, keepdims=True))
    scores = s / s.sum(-1, keepdims=True)
    probs = scores
  else:
    scores = 1 / (1 + np.exp(-logits))
    probs = scores / scores.sum(-1, keepdims=True)
  sel = scores + (0 if bias is None else np.asarray(bias, np.float64))
  experts = np.argsort(-sel, axis=-1, kind="stable")[:, :spec.top_k]   # ties: lower id first
  weights = np.take_along_axis(scores, experts, -1)
  if spec.renormalize:
    weights = weights / (weights.sum(-1, keepdims=True) + spec.eps)
  flat = experts.reshape(-1)
  e = w.shape[1]
  return dict(weights=weights * spec.scale, experts=experts,
              sort_idx=np.argsort(flat, kind="stable"), sizes=np.bincount(flat, minlength=e),
              mean_prob=probs.mean(0), z=np.mean(np.log(np.exp(logits).sum(-1)) ** 2))


def inputs(seed, t, d, e, dtype, with_bias):
  """numpy draws: no per-shape jax.random compiles."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((t, d), np.float32)).astype(dtype)
  w = jnp.asarray(rng.standard_normal((d, e), np.float32) * d ** -0.5)
  bias = jnp.asarray(rng.standard_normal(e, np.float32) * 0.1) if with_bias else None
  return x, w, bias


@pytest.mark.parametrize("backend", ["reference", "split"])
@pytest.mark.parametrize("spec_i", range(len(SPECS)))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_route_matches_oracle(backend, spec_i, dtype):
  spec = SPECS[spec_i]
  x, w, bias = inputs(spec_i * 7 + 1, 96, 64, 16, dtype, spec.scoring == "sigmoid")
  r = kp.route(x, w, bias, spec, backend=backend)
  o = oracle(x, w, bias, spec)
  np.testing.assert_array_equal(np.asarray(r.experts_tk), o["experts"])
  # split with f32 x: three bf16 products, ~2^-15 relative (documented in split.py)
  rtol = 1e-4 if (backend == "split" and dtype == jnp.float32) else 2e-5
  np.testing.assert_allclose(r.weights_tk, o["weights"], rtol=rtol, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(r.sort_idx_m), o["sort_idx"])
  np.testing.assert_array_equal(np.asarray(r.slot_pos_m), np.argsort(o["sort_idx"]))
  np.testing.assert_array_equal(np.asarray(r.group_sizes_e), o["sizes"])
  np.testing.assert_allclose(r.expert_frac_e, o["sizes"] / o["sort_idx"].size, rtol=1e-6)
  np.testing.assert_allclose(r.mean_prob_e, o["mean_prob"], rtol=rtol, atol=1e-7)
  np.testing.assert_allclose(r.z_loss, o["z"], rtol=rtol)
  assert r.experts_tk.dtype == jnp.int32 and r.weights_tk.dtype == jnp.float32


def test_ties_pick_lower_expert_first():
  x = jnp.ones((4, 8), jnp.float32)
  w = jnp.zeros((8, 6), jnp.float32)          # every logit equal
  for backend in ("reference", "split"):
    r = jax.jit(lambda x, w: kp.route(x, w, None, RouterSpec(top_k=3), backend=backend))(x, w)
    np.testing.assert_array_equal(np.asarray(r.experts_tk), np.tile([0, 1, 2], (4, 1)))
    np.testing.assert_array_equal(np.asarray(r.sort_idx_m), np.argsort(
        np.tile([0, 1, 2], 4), kind="stable"))


@pytest.mark.parametrize("spec_i", [0, 2])
def test_split_grads_match_reference(spec_i):
  spec = SPECS[spec_i]
  x, w, bias = inputs(30 + spec_i, 64, 32, 16, jnp.float32, spec.scoring == "sigmoid")
  c = jnp.asarray(np.random.default_rng(5).standard_normal((64, spec.top_k), np.float32))

  def loss(x, w, backend):
    r = kp.route(x, w, bias, spec, backend=backend)
    return jnp.sum(r.weights_tk * c) + r.z_loss + jnp.sum(r.mean_prob_e * r.expert_frac_e)

  grad = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)
  ref, got = grad(x, w, "reference"), grad(x, w, "split")
  for a, b in zip(got, ref):   # norm-relative: elementwise cancellation is not an error
    assert np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b) < 1e-4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_split_one_token_path(dtype):
  """T = 1 takes the chunked-reduction logits (batch-1 decode): fp32-accurate, same gradients."""
  spec = SPECS[0]
  x, w, _ = inputs(41, 1, 256, 16, dtype, False)
  r = jax.jit(lambda x, w: kp.route(x, w, None, spec, backend="split"))(x, w)
  o = oracle(x, w, None, spec)
  np.testing.assert_array_equal(np.asarray(r.experts_tk), o["experts"])
  np.testing.assert_allclose(r.weights_tk, o["weights"], rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(r.z_loss, o["z"], rtol=2e-6)
  fwd = str(jax.make_jaxpr(lambda x, w: kp.route(x, w, None, spec, backend="split"))(x, w))
  assert "optimization_barrier" in fwd and "dot_general" not in fwd
  c = jnp.arange(1.0, 1.0 + spec.top_k)

  def loss(x, w, backend):
    return jnp.sum(kp.route(x, w, None, spec, backend=backend).weights_tk * c)
  grad = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)
  for a, b in zip(grad(x, w, "split"), grad(x, w, "reference")):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    # bf16 x: dx is rounded to bf16 (2^-8) in both backends' casts, in different orders
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < (1e-4 if dtype == jnp.float32 else 1e-2)


def test_bad_top_k_names_the_fix():
  x, w, _ = inputs(0, 4, 8, 4, jnp.float32, False)
  with pytest.raises(ValueError, match="top_k"):
    kp.route(x, w, None, RouterSpec(top_k=5))


@pytest.mark.parametrize("method", ["key_sort", "argsort"])
def test_expert_order_methods_are_the_stable_argsort(method):
  experts = np.random.default_rng(4).integers(0, 7, 300).astype(np.int32)
  got = kp.expert_order(jnp.asarray(experts), 7, method)
  np.testing.assert_array_equal(np.asarray(got), np.argsort(experts, kind="stable"))
  inv = np.asarray(kp.inverse_permutation(got))
  np.testing.assert_array_equal(inv[np.asarray(got)], np.arange(300))


# The fused GPU router: its glue (ranks -> experts, order without a sort, statistics, custom_vjp)
# runs on CPU with the kernel's jnp contract swapped in; the kernel itself under @pytest.mark.gpu.
FUSED_SPECS = [SPECS[0], SPECS[2]]


@pytest.fixture
def kernel_contract(monkeypatch):
  from kernels_pallas.router import gpu
  monkeypatch.setattr(gpu, "fused_router", gpu.fused_router_reference)
  return gpu


@pytest.mark.parametrize("spec_i", range(len(FUSED_SPECS)))
def test_fused_router_glue_matches_oracle(kernel_contract, spec_i):
  spec = FUSED_SPECS[spec_i]
  x, w, bias = inputs(40 + spec_i, 256, 64, 64, jnp.bfloat16, spec.scoring == "sigmoid")
  x = x.at[:4].set(0)   # rows of equal logits: ties must still go to the lower id
  r = jax.jit(lambda x, w, b: kernel_contract.route_gpu(x, w, b, spec))(x, w, bias)
  o = oracle(x, w, bias, spec)
  np.testing.assert_array_equal(np.asarray(r.experts_tk), o["experts"])
  np.testing.assert_allclose(r.weights_tk, o["weights"], rtol=2e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(r.sort_idx_m), o["sort_idx"])
  np.testing.assert_array_equal(np.asarray(r.slot_pos_m), np.argsort(o["sort_idx"]))
  np.testing.assert_array_equal(np.asarray(r.group_sizes_e), o["sizes"])
  np.testing.assert_allclose(r.mean_prob_e, o["mean_prob"], rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(r.z_loss, o["z"], rtol=2e-5)


def test_fused_router_grads_match_reference(kernel_contract):
  spec = SPECS[2]
  x, w, bias = inputs(50, 256, 64, 64, jnp.bfloat16, True)
  c = jnp.asarray(np.random.default_rng(6).standard_normal((256, spec.top_k), np.float32))

  def loss(x, w, fused):
    r = (kernel_contract.route_gpu(x, w, bias, spec) if fused
         else kp.route(x, w, bias, spec, backend="reference"))
    return jnp.sum(r.weights_tk * c) + r.z_loss

  grad = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)
  for a, b in zip(grad(x, w, True), grad(x, w, False)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-2   # dx is rounded to bf16 x's dtype


def test_fused_router_dispatch_and_messages():
  from kernels_pallas.router import gpu
  bf16 = jnp.bfloat16
  assert gpu.select_tiling(65536, 4096, 64, 8, bf16) == gpu.DEFAULT
  assert gpu.select_tiling(65536, 4096, 192, 8, bf16) is None      # Hy3: past the registers
  assert gpu.select_tiling(65536, 4096, 16, 1, bf16) is None       # Large: E = 16
  assert gpu.select_tiling(100, 4096, 64, 8, bf16) is None         # decode-sized T
  assert gpu.select_tiling(4096, 4096, 64, 8, jnp.float32) is None
  assert gpu.select_tiling(65536, 4096, 64, 4, bf16) is None       # k: whole [64, 8] tiles
  x, w, _ = inputs(0, 100, 64, 64, bf16, False)
  with pytest.raises(ValueError, match="backend='split'"):
    kp.route(x, w, None, SPECS[0], backend="gpu")
  x, w, bias = inputs(0, 256, 64, 64, bf16, True)
  with pytest.raises(ValueError, match="softmax"):
    kp.route(x, w, bias, SPECS[0], backend="gpu")


def test_selection_keys_order_like_the_values_ties_to_the_lower_id():
  from kernels_pallas.router import gpu
  v = jnp.asarray([[-2.0, -1.0, 0.0, 1.0, 1.0, -0.5, 3.5, 3.5, 1.0 + 2.0 ** -20, -jnp.inf]])
  keys = gpu.selection_keys(v, jnp.arange(v.shape[1], dtype=jnp.int32))
  top, _ = jax.lax.top_k(keys, v.shape[1])
  # 1 + 2^-20 is within the keys' 2^-17 resolution of 1.0: a tie, so id order decides
  assert np.asarray(gpu.key_expert(top))[0].tolist() == [6, 7, 3, 4, 8, 2, 5, 1, 0, 9]


def test_fused_router_kernel_lowers_for_cuda_on_cpu(monkeypatch):
  """The Mosaic GPU router lowers to CUDA here, without a GPU (catches lowering errors)."""
  from kernels_pallas import _compat
  from kernels_pallas.router import gpu, order_gpu
  monkeypatch.setattr(_compat, "num_sms", lambda: 132)
  bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  for spec in FUSED_SPECS:
    bias = jax.ShapeDtypeStruct((64,), jnp.float32) if spec.scoring == "sigmoid" else None
    for with_logits in (False, True):
      fn = lambda x, hi, lo, b: gpu.fused_router(x, hi, lo, b, spec, with_logits=with_logits)
      text = jax.jit(fn).trace(bf(256, 128), bf(128, 64), bf(128, 64), bias).lower(
          lowering_platforms=("cuda",)).as_text()
      assert "mosaic_gpu" in text
  text = jax.jit(order_gpu.expert_order).trace(
      jax.ShapeDtypeStruct((4096 * 2, 8), jnp.int32), bf(4096 * 2, 64),
      jax.ShapeDtypeStruct((2, 192, 64), jnp.float32)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def _random_prefixes(seed, tokens, experts=64, top_k=8):
  """Inputs of expert_order as the fused kernel writes them, from random distinct picks."""
  from kernels_pallas.router import order_gpu
  rng = np.random.default_rng(seed)
  picks = np.argsort(rng.random((tokens, experts)) ** rng.uniform(0.2, 3, experts), axis=1)
  experts_tk = np.sort(picks[:, :top_k], axis=1).astype(np.int32)
  hits = np.zeros((tokens, experts), np.float32)
  np.put_along_axis(hits, experts_tk, 1.0, axis=1)
  upto = np.cumsum(hits.reshape(-1, order_gpu.BLOCK, experts), axis=1).reshape(tokens, experts)
  stats = rng.standard_normal((2, 192, experts)).astype(np.float32)
  return experts_tk, jnp.asarray(upto, jnp.bfloat16), jnp.asarray(stats)


def test_expert_order_reference_gives_the_stable_order():
  from kernels_pallas.router import order_gpu
  experts_tk, upto, stats = _random_prefixes(7, 1024)
  sort_idx, place, sizes, frac, mean_prob, z = order_gpu.expert_order_reference(
      jnp.asarray(experts_tk), upto, stats)
  flat = experts_tk.reshape(-1)
  np.testing.assert_array_equal(np.asarray(sort_idx), np.argsort(flat, kind="stable"))
  np.testing.assert_array_equal(np.asarray(place)[np.asarray(sort_idx)], np.arange(flat.size))
  np.testing.assert_array_equal(np.asarray(sizes), np.bincount(flat, minlength=64))
  np.testing.assert_allclose(frac, np.bincount(flat, minlength=64) / flat.size, rtol=1e-6)
  np.testing.assert_allclose(mean_prob, np.asarray(stats)[0].sum(0) / 1024, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(z, np.asarray(stats)[1].sum() / 1024, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", (4096, 4096 * 3, 65536))
def test_gpu_expert_order_kernel(tokens):
  if not _dispatch.is_hopper():
    pytest.skip("the Mosaic GPU kernel needs a Hopper GPU")
  from kernels_pallas.router import order_gpu
  experts_tk, upto, stats = _random_prefixes(tokens, tokens)
  got = jax.jit(order_gpu.expert_order)(jnp.asarray(experts_tk), upto, stats)
  want = order_gpu.expert_order_reference(jnp.asarray(experts_tk), upto, stats)
  for g, w in zip(got[:3], want[:3]):   # the order, its inverse, the sizes: exact
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  for g, w in zip(got[3:], want[3:]):   # fractions, mean probabilities, z-loss: f32 sums
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("stages,dim", ((4, 512), (3, 128)))   # 128: 2 K steps a tile
@pytest.mark.parametrize("spec_i", range(len(FUSED_SPECS)))
def test_gpu_fused_router_kernel(spec_i, stages, dim):
  """Every CTA gets 2 or 3 tiles: the load ring and the logits hand-over wrap around."""
  if not _dispatch.is_hopper():
    pytest.skip("the Mosaic GPU router needs a Hopper GPU")
  from kernels_pallas import _compat
  from kernels_pallas.router import gpu
  from kernels_pallas.router.split import split_bf16
  spec = FUSED_SPECS[spec_i]
  tokens = 2 * gpu.BLOCK * (2 * _compat.num_sms() + 3)
  x, w, bias = inputs(60 + spec_i, tokens, dim, 64, jnp.bfloat16, spec.scoring == "sigmoid")
  x = x.at[:3].set(0)   # all-equal rows: ties to the lower id
  w_hi, w_lo = split_bf16(w)
  want = gpu.fused_router_reference(x, w_hi, w_lo, bias, spec, with_logits=True)
  for with_logits in (True, False):
    tiling = dataclasses.replace(gpu.DEFAULT, stages=stages)
    got = jax.jit(functools.partial(gpu.fused_router, spec=spec, with_logits=with_logits,
                                    tiling=tiling))(x, w_hi, w_lo, bias)
    if with_logits:
      np.testing.assert_allclose(got.logits_te, want.logits_te, rtol=1e-5, atol=1e-5)
    else:
      assert got.logits_te is None
    same = np.asarray(got.experts_tk) == np.asarray(want.experts_tk)
    assert same.mean() > 0.999, same.mean()   # near-ties may flip between fp32 summation orders
    assert same[:3].all()
    rows = same.all(axis=1)                   # tokens with identical picks: compare the weights
    np.testing.assert_allclose(np.asarray(got.weights_tk)[rows], np.asarray(want.weights_tk)[rows],
                               rtol=2e-5, atol=1e-6)
    blocks = rows.reshape(-1, gpu.BLOCK).all(axis=1)   # blocks with identical picks: exact prefixes
    assert blocks.mean() > 0.5, blocks
    np.testing.assert_array_equal(
        np.asarray(got.upto_te, np.float32).reshape(-1, gpu.BLOCK, 64)[blocks],
        np.asarray(want.upto_te, np.float32).reshape(-1, gpu.BLOCK, 64)[blocks])
    got_st, want_st = np.asarray(got.stats_spe), np.asarray(want.stats_spe)
    assert got_st.shape[1] % gpu.BLOCK == 0 and got_st.shape[1] >= _compat.num_sms()
    np.testing.assert_array_equal(got_st[:, _compat.num_sms():], 0.0)   # the padding rows
    np.testing.assert_allclose(got_st[0].sum(0), want_st[0].sum(0), rtol=1e-5)
    np.testing.assert_allclose(got_st[1].sum(), want_st[1].sum(), rtol=1e-5)
  r = kp.route(x, w, bias, spec, backend="gpu")
  o = oracle(x, w, bias, spec)
  assert np.mean(np.asarray(r.experts_tk) == o["experts"]) > 0.999
  flat = np.asarray(r.experts_tk).reshape(-1)
  np.testing.assert_array_equal(np.asarray(r.sort_idx_m), np.argsort(flat, kind="stable"))

"""kernels_pallas.decode_attention: the reference against a float64 oracle on CPU; the Mosaic GPU
kernel against the reference (and inside the model's cached decode) under @pytest.mark.gpu."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas as kp
from kernels_pallas.decode_attention import NEG
from kernels_pallas.decode_attention import reference

# B, kv, R, D, S, layers, layer, lengths: empty rows, one row, partial and full blocks,
# R not a multiple of 4 (the kernel pads the stats), several layers.
CASES = [
    (1, 8, 4, 128, 16384, 3, 2, [2049]),
    (4, 8, 4, 128, 1024, 2, 1, [0, 1, 63, 1000]),
    (2, 8, 8, 128, 512, 1, 0, [65, 512]),
    (3, 2, 5, 64, 256, 2, 1, [129, 7, 256]),
]
SMALL = [(b, kv, r, d, min(s, 512), n, lay, [min(x, 512) for x in ln])
         for b, kv, r, d, s, n, lay, ln in CASES]


def inputs(case, dtype, seed=0):
  b, kv, r, d, s, n, layer, lengths = case
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, kv, r, d)).astype(np.float32)
  k = rng.standard_normal((n, b, kv, s, d)).astype(np.float32)
  v = rng.standard_normal((n, b, kv, s, d)).astype(np.float32)
  return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
          jnp.asarray(lengths, jnp.int32), layer)


def oracle(q, k, v, lengths, layer):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, kv, r, d = q.shape
  o, lse = np.zeros((b, kv, r, d)), np.full((b, kv, r), NEG)
  for i, n in enumerate(np.asarray(lengths)):
    if n == 0:
      continue
    s = q[i] @ np.swapaxes(k[layer, i, :, :n], 1, 2) / np.sqrt(d)        # [kv, r, n]
    lse[i] = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    o[i] = np.exp(s - lse[i][..., None]) @ v[layer, i, :, :n]
  return o, lse


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("case", SMALL)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_reference_matches_oracle(case, dtype, tol):
  q, k, v, lengths, layer = inputs(case, dtype)
  o, lse = jax.jit(reference.decode_attention_reference)(q, k, v, lengths, jnp.int32(layer))
  want_o, want_lse = oracle(q, k, v, lengths, layer)
  assert rel_err(o, want_o) < tol
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-3)
  empty = np.asarray(lengths) == 0
  assert not np.any(np.asarray(o)[empty]), "a row with no cached keys must give o = 0"


def test_unstacked_cache_and_shape_errors():
  q, k, v, lengths, layer = inputs(SMALL[1], jnp.float32)
  o1, _ = kp.decode_attention(q, k, v, lengths, layer)
  o2, _ = kp.decode_attention(q, k[layer], v[layer], lengths)
  np.testing.assert_array_equal(o1, o2)
  with pytest.raises(ValueError, match="pass layer="):
    kp.decode_attention(q, k, v, lengths)
  with pytest.raises(ValueError, match="does not match the cache"):
    kp.decode_attention(q[:, :1], k, v, lengths, layer)
  assert kp.decode_attention_backend(q.shape, k.shape, q.dtype) == "reference"   # CPU
  with pytest.raises(ValueError, match="differ in dtype"):
    kp.decode_attention(q, k, v.astype(jnp.bfloat16), lengths, layer)
  from kernels_pallas.decode_attention import gpu
  assert "differs" in gpu.why_not((1, 8, 4, 128), (1, 1, 8, 256, 128), jnp.bfloat16,
                                  cache_dtype=jnp.float32)
  with pytest.raises(ValueError, match="unknown backend"):
    kp.decode_attention(q, k, v, lengths, layer, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_gpu_kernel_matches_reference(case):
  from kernels_pallas.decode_attention import gpu
  q, k, v, lengths, layer = inputs(case, jnp.bfloat16, seed=1)
  got_o, got_lse = jax.jit(lambda *a: kp.decode_attention(*a, backend="gpu"))(q, k, v, lengths, layer)
  o, lse = reference.decode_attention_reference(q, k, v, lengths, jnp.int32(layer))
  # bf16 probabilities are rounded at different running maxima: ~2e-3 measured (H100).
  assert rel_err(got_o, o) < 1e-2
  has = np.asarray(lengths) > 0
  np.testing.assert_allclose(np.asarray(got_lse)[has], np.asarray(lse)[has], rtol=1e-5, atol=1e-4)
  assert not np.any(np.asarray(got_o)[~has])
  for t in (gpu.Tiling(block_kv=128, stages=2), gpu.Tiling(splits=3)):   # other tilings, same answer
    o_t, _ = jax.jit(lambda *a, t=t: gpu.decode_attention(*a, t))(q, k, v, lengths, layer)
    assert rel_err(o_t, o) < 1e-2, t


@pytest.mark.gpu
def test_gpu_cached_decode_uses_the_kernel_and_matches_reference(monkeypatch):
  """The model's decode step with the kernel reading the stacked cache against the reference op."""
  from hunyuan_jax.model import forward, init_cache, init_params
  from hunyuan_jax.model.attention import cache_read_in_place
  from tiny_configs import tiny
  cfg = tiny("a13b", hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=128,
             dtype="bfloat16", param_dtype="bfloat16")
  assert cache_read_in_place(cfg, 2, 256)
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 100), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(100), (2, 100))
  fwd = jax.jit(forward, static_argnames=("cfg",))
  cache = fwd(params, tokens[:, :99], pos[:, :99], init_cache(cfg, 2, 256), cfg=cfg).cache
  logits, kernels = {}, {}
  for impl in ("gpu", "reference"):   # the prefill above has 99 x 4 rows a kv head: reference
    monkeypatch.setenv("KERNELS_PALLAS_BACKEND", f"decode_attention={impl}")
    # a fresh function per backend: jit caches traces by function, and the backend is read at trace time
    step = jax.jit(lambda p, t, q, c: forward(p, t, q, c, cfg=cfg))
    kernels[impl] = step.lower(params, tokens[:, 99:], pos[:, 99:], cache).as_text().count("mosaic_gpu")
    logits[impl] = np.asarray(step(params, tokens[:, 99:], pos[:, 99:], cache).logits)
  assert kernels["gpu"] > kernels["reference"]
  assert rel_err(logits["gpu"], logits["reference"]) < 2e-2
  # the serving layout (one q/k/v GEMM, attention.fuse_qkv) on the same kernel
  from hunyuan_jax.model.attention import fuse_qkv
  monkeypatch.setenv("KERNELS_PALLAS_BACKEND", "decode_attention=gpu")
  step = jax.jit(lambda p, t, q, c: forward(p, t, q, c, cfg=cfg))
  fused = np.asarray(step(fuse_qkv(params), tokens[:, 99:], pos[:, 99:], cache).logits)
  assert rel_err(fused, logits["reference"]) < 2e-2

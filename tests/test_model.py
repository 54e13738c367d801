"""The functional core on tiny random models of every family: cache, greedy, structure, grads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hunyuan_jax.model import forward_mtp, init_cache, init_params, param_logical_axes
from hunyuan_jax.model import forward as _forward
from hunyuan_jax.model.greedy import greedy_generate
from tiny_configs import tiny

forward = jax.jit(_forward, static_argnames=("cfg",))  # eager dispatch of every op is slow on CPU

FAMILIES = ["a13b", "large", "hy3", "dense"]


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_decode_match_full_forward(family):
  cfg = tiny(family)
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
  full = forward(params, tokens, pos, cfg=cfg).logits
  cache = init_cache(cfg, 2, 16, jnp.float32)
  pieces = []
  for start, stop in ((0, 4), (4, 8), (8, 9), (9, 10), (10, 11)):  # two prefill chunks, then decode
    out = forward(params, tokens[:, start:stop], pos[:, start:stop], cache, cfg=cfg)
    pieces.append(out.logits)
    cache = out.cache
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["a13b", "hy3"])
def test_greedy_generate_equals_uncached_argmax(family):
  cfg = tiny(family)
  params = init_params(cfg, jax.random.key(2))
  prompt = jax.random.randint(jax.random.key(3), (1, 5), 0, cfg.vocab_size)
  got = greedy_generate(params, prompt, cfg=cfg, max_new_tokens=6)
  toks = prompt
  for _ in range(6):
    logits = forward(params, toks, jnp.arange(toks.shape[1])[None], cfg=cfg).logits
    toks = jnp.concatenate([toks, jnp.argmax(logits[:, -1], -1)[:, None].astype(toks.dtype)], 1)
  np.testing.assert_array_equal(got, toks[:, 5:])


def test_rows_of_a_batch_are_independent():
  """Different lengths in one cache: a slot never sees another slot's (or stale) entries."""
  cfg = tiny("a13b")
  params = init_params(cfg, jax.random.key(4))
  a = jax.random.randint(jax.random.key(5), (1, 6), 0, cfg.vocab_size)
  alone = forward(params, a, jnp.arange(6)[None], cfg=cfg).logits[0, -1]
  cache = init_cache(cfg, 2, 8, jnp.float32)
  # Fill row 1 with unrelated tokens first, then prefill row 0 while row 1 carries padding.
  junk = jax.random.randint(jax.random.key(6), (2, 8), 0, cfg.vocab_size)
  cache = forward(params, junk, jnp.broadcast_to(jnp.arange(8), (2, 8)), cache, cfg=cfg).cache
  batch = jnp.concatenate([a, junk[1:, :6]], 0)
  out = forward(params, batch, jnp.broadcast_to(jnp.arange(6), (2, 6)), cache, cfg=cfg)
  np.testing.assert_allclose(out.logits[0, -1], alone, rtol=1e-5, atol=1e-5)


def test_structure_follows_the_config():
  large = init_params(tiny("large"), jax.random.key(0))
  assert set(large["groups_0"]) == {"layer_0", "layer_1"}
  assert "k" in large["groups_0"]["layer_0"]["attn"] and "k" not in large["groups_0"]["layer_1"]["attn"]
  assert large["groups_0"]["layer_0"]["attn"]["q"].shape[0] == 2  # 4 layers = 2 scanned pairs
  hy3 = init_params(tiny("hy3"), jax.random.key(0))
  assert "mlp" in hy3["groups_0"]["layer_0"] and "moe" in hy3["groups_1"]["layer_0"]
  assert hy3["groups_1"]["layer_0"]["moe"]["expert_bias"].dtype == jnp.float32
  assert "lm_head" in hy3 and "lm_head" not in large
  axes = param_logical_axes(tiny("a13b"))
  assert tuple(axes["groups_0"]["layer_0"]["moe"]["wi"]) == ("layers", "experts", "embed", None, "mlp")


def test_expert_bias_only_changes_selection():
  """Hy3: the bias picks experts but the weights come from the unbiased sigmoid scores."""
  cfg = tiny("hy3", num_layers=2)
  params = init_params(cfg, jax.random.key(7))
  tokens = jax.random.randint(jax.random.key(8), (1, 9), 0, cfg.vocab_size)
  pos = jnp.arange(9)[None]
  base = forward(params, tokens, pos, cfg=cfg).logits
  bias = params["groups_1"]["layer_0"]["moe"]["expert_bias"]
  same_order = jax.tree.map(lambda x: x, params)
  same_order["groups_1"]["layer_0"]["moe"]["expert_bias"] = bias + 5.0  # uniform shift: same top-k
  np.testing.assert_allclose(forward(params=same_order, tokens_bt=tokens, positions_bt=pos, cfg=cfg).logits,
                             base, rtol=1e-6, atol=1e-6)
  skewed = jax.tree.map(lambda x: x, params)
  skewed["groups_1"]["layer_0"]["moe"]["expert_bias"] = bias.at[:, 0].add(10.0)  # [layers, E]: forces expert 0 in
  assert float(jnp.max(jnp.abs(forward(skewed, tokens, pos, cfg=cfg).logits - base))) > 1e-4


def test_mtp_head_runs_and_differentiates():
  cfg = tiny("hy3")
  params = init_params(cfg, jax.random.key(9))
  tokens = jax.random.randint(jax.random.key(10), (2, 7), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))

  def loss(p):
    out = _forward(p, tokens, pos, cfg=cfg)
    mtp_logits, _ = forward_mtp(p, out.hidden[:, :-1], tokens[:, 1:], pos[:, :-1], cfg=cfg)
    return jnp.mean(mtp_logits[0] ** 2), mtp_logits[0].shape

  grads, shape = jax.jit(jax.grad(loss, has_aux=True))(params)
  assert shape == (2, 6, cfg.vocab_size)
  assert float(jnp.abs(grads["mtp_0"]["eh_proj"]).sum()) > 0


def test_gradients_flow_to_every_parameter():
  cfg = tiny("a13b", num_layers=2)
  params = init_params(cfg, jax.random.key(11))
  tokens = jax.random.randint(jax.random.key(12), (2, 8), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))

  def loss(p):
    logits = _forward(p, tokens, pos, cfg=cfg).logits
    return -jnp.mean(jax.nn.log_softmax(logits[:, :-1]) * jax.nn.one_hot(tokens[:, 1:], cfg.vocab_size))

  grads = jax.jit(jax.grad(loss))(params)
  zero = [jax.tree_util.keystr(k) for k, g in jax.tree_util.tree_leaves_with_path(grads)
          if not np.any(np.asarray(g))]
  assert not zero, f"parameters without gradient: {zero}"


def test_einsum_f32_backward_runs_in_the_operand_dtype():
  """fp32 logits/scores, but the two gradient matmuls stay bf16 (fp32 ones are ~4x slower)."""
  from hunyuan_jax.model.layers import einsum_f32
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((2, 5, 16)), rng.standard_normal((16, 9))
  loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))
  ours = loss(lambda a, b: einsum_f32("btd,dv->btv", a, b))
  plain = loss(lambda a, b: jnp.einsum("btd,dv->btv", a, b, preferred_element_type=jnp.float32))
  a32, b32 = jnp.float32(a), jnp.float32(b)
  for g_ours, g_plain in zip(jax.grad(ours, (0, 1))(a32, b32), jax.grad(plain, (0, 1))(a32, b32)):
    np.testing.assert_allclose(g_ours, g_plain, rtol=1e-6, atol=1e-6)
  a16, b16 = a32.astype(jnp.bfloat16), b32.astype(jnp.bfloat16)
  assert ours(a16, b16).dtype == jnp.float32
  def f32_dots(f):   # dots with an fp32 result; their operands are upcast when any is fp32
    hlo = jax.jit(jax.grad(f, (0, 1))).lower(a16, b16).compiler_ir("hlo").as_hlo_text()
    return [l for l in hlo.splitlines() if " dot(" in l and "= f32[" in l]
  assert len(f32_dots(ours)) == 1, f32_dots(ours)      # the forward only
  assert len(f32_dots(plain)) == 3                      # what the wrapper avoids


def test_take_rows_gradient_equals_jnp_take():
  """The MoE dispatch/combine permutation: gather-based backward == jnp.take's scatter-add."""
  from hunyuan_jax.model.moe import take_rows
  rng = np.random.default_rng(0)
  t, k, d = 7, 3, 5
  perm = jnp.asarray(rng.permutation(t * k), jnp.int32)
  inv = jnp.argsort(perm).astype(jnp.int32)
  w = jnp.asarray(rng.standard_normal((t * k, d)), jnp.float32)
  for fan_out, n, p, q in ((k, t, perm, inv), (1, t * k, inv, perm)):
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    ours = lambda x: jnp.sum(jnp.sin(take_rows(x, p, q, fan_out)) * w)
    plain = lambda x: jnp.sum(jnp.sin(jnp.take(x, p // fan_out, axis=0)) * w)
    np.testing.assert_allclose(ours(x), plain(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(plain)(x), rtol=1e-5, atol=1e-6)


def test_down_combine_equals_plain_gmm_and_weighted_sum():
  """The MoE's down projection + combine: its backward (no down-projection output kept) gives
  the gradients of the plain formula, with padded rows (assignments to other experts) included."""
  import kernels_pallas as kp
  from hunyuan_jax.model.moe import down_combine
  rng = np.random.default_rng(3)
  t, k, e, f, d = 6, 2, 3, 8, 5
  perm = jnp.asarray(rng.permutation(t * k), jnp.int32)
  inv = jnp.argsort(perm).astype(jnp.int32)
  gs = jnp.asarray([4, 0, 5], jnp.int32)                 # 9 of 12 rows: the last 3 give 0
  act = jnp.asarray(rng.standard_normal((t * k, f)), jnp.float32)
  wo = jnp.asarray(rng.standard_normal((e, f, d)), jnp.float32)
  weights = jnp.asarray(rng.random((t, k)), jnp.float32)
  probe = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)

  def plain(act, wo, weights):
    y = kp.gmm(act, wo, gs, backend="reference")
    y_tkd = jnp.take(y, inv, axis=0).reshape(t, k, d)
    return jnp.sum(jnp.sin(jnp.einsum("tkd,tk->td", y_tkd, weights)) * probe)

  ours = lambda act, wo, weights: jnp.sum(
      jnp.sin(down_combine(act, wo, gs, perm, inv, weights, k, "reference")) * probe)
  np.testing.assert_allclose(ours(act, wo, weights), plain(act, wo, weights), rtol=1e-6)
  g_ours = jax.jit(jax.grad(ours, (0, 1, 2)))(act, wo, weights)
  g_plain = jax.jit(jax.grad(plain, (0, 1, 2)))(act, wo, weights)
  for name, a, b in zip(("act", "w_down", "weights"), g_ours, g_plain):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
  assert np.all(np.asarray(g_ours[0])[9:] == 0)         # rows past sum(group_sizes)


@pytest.mark.parametrize("family", ["a13b", "hy3"])
def test_one_token_moe_equals_the_sorted_path(family):
  """T = 1 (batch-1 decode) takes the sort-free gmv path; its output is the general path's."""
  from hunyuan_jax.model.moe import moe_ffn
  cfg = tiny(family, num_layers=2, num_experts=8, moe_top_k=(3, 3))
  rng = np.random.default_rng(5)
  e, d, f, k = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size[0], 3
  draw = lambda *s: jnp.asarray(0.3 * rng.standard_normal(s), jnp.float32)   # outputs O(1)
  args = (draw(d, e), draw(e) if cfg.router_bias else None, draw(e, d, 2, f), draw(e, f, d))
  x = draw(1, d)
  run = lambda x: moe_ffn(x, *args, cfg=cfg, top_k=k, dtype=jnp.float32)[0]
  one = run(x)                                           # the gmv path
  two = run(jnp.concatenate([x, draw(1, d)]))            # T = 2: sort + gmm
  np.testing.assert_allclose(one[0], two[0], rtol=1e-5, atol=1e-5)
  g_one = jax.grad(lambda x: jnp.sum(jnp.sin(run(x))))(x)
  g_two = jax.grad(lambda x: jnp.sum(jnp.sin(run(jnp.concatenate([x, x]))[:1])))(x)
  np.testing.assert_allclose(g_one, g_two, rtol=1e-4, atol=1e-5)


def _count_pallas_calls(jaxpr) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "pallas_call"
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          n += _count_pallas_calls(inner)
  return n


@pytest.mark.parametrize("policy,kernels", [("none", 6), ("dots", 6), ("dots_except_experts", 7),
                                            ("full", 7)])
def test_remat_dots_does_not_rerun_the_expert_matmuls(policy, kernels):
  """Gradient of one MoE layer = 2 forward gmms + 4 backward (up dx, up dW, down dx, down dW).
  jax's dot policies miss the Pallas gmm; "dots" names its output so it is not run again."""
  cfg = tiny("a13b", num_layers=1, hidden_size=128, num_heads=4, head_dim=32, num_experts=4,
             moe_intermediate_size=(128,), remat_policy=policy, moe_impl="tpu_interpret")
  params = init_params(cfg, jax.random.key(0))
  tokens = jnp.zeros((1, 8), jnp.int32)
  pos = jnp.arange(8)[None]
  loss = lambda p: jnp.sum(_forward(p, tokens, pos, cfg=cfg).logits)
  assert _count_pallas_calls(jax.make_jaxpr(jax.grad(loss))(params).jaxpr) == kernels


@pytest.mark.gpu
@pytest.mark.parametrize("num_experts", [4, 64])   # 64: the fused Mosaic router runs too
def test_gpu_moe_gradients_match_reference_ops(num_experts, monkeypatch):
  """The model's MoE on the Mosaic GPU kernels (forward, down_combine's backward, remat "dots")
  against the jnp reference ops, bf16."""
  grads = {}
  for impl in ("gpu", "reference"):
    monkeypatch.setenv("KERNELS_PALLAS_BACKEND", "" if impl == "gpu" else "route=reference")
    cfg = tiny("a13b", num_layers=1, hidden_size=512, num_heads=4, num_kv_heads=2, head_dim=128,
               num_experts=num_experts, moe_intermediate_size=(256,),
               shared_expert_size=(256,), dtype="bfloat16", param_dtype="bfloat16",
               remat_policy="dots", moe_impl=impl)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(128), (2, 128))
    loss = lambda p: jnp.mean(_forward(p, tokens, pos, cfg=cfg).logits.astype(jnp.float32) ** 2)
    grads[impl] = jax.jit(jax.grad(loss))(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads["gpu"]),
                          jax.tree.leaves(grads["reference"])):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err < 2e-2, (jax.tree_util.keystr(path), err)


def test_head_split_for_an_odd_vocabulary_gives_the_same_logits():
  """Several rows and V % 8 != 0: the head runs as aligned rows + the rest (no padded copy of
  the weight on GPU); every logit is still hidden . head row."""
  cfg = tiny("a13b", num_layers=1, vocab_size=389)
  params = init_params(cfg, jax.random.key(0))
  tokens = jnp.asarray([[3, 5, 7], [11, 13, 17]], jnp.int32)
  with jax.default_matmul_precision("highest"):   # GPUs default to TF32 for f32 dots
    out = _forward(params, tokens, jnp.broadcast_to(jnp.arange(3), (2, 3)), cfg=cfg)
    want = jnp.einsum("btd,vd->btv", out.hidden, params["embed"])
  assert out.logits.shape == (2, 3, 389)
  np.testing.assert_allclose(out.logits, want, rtol=1e-5, atol=1e-6)


def test_projection_of_few_rows_matches_einsum():
  """`project` at decode sizes (a batched GEMM over contraction chunks, summed in fp32; one row
  doubled) and above them (a plain dot), for one and two contracted dims, in the einsum's dtype."""
  from hunyuan_jax.model.layers import FEW_ROWS, project
  key = iter(jax.random.split(jax.random.key(0), 8))
  w1 = jax.random.normal(next(key), (512, 4, 64))         # q/k/v: [D, heads, head_dim]
  w2 = jax.random.normal(next(key), (4, 64, 384))         # o: [heads, head_dim, D], K = 256
  with jax.default_matmul_precision("highest"):   # GPUs default to TF32 for f32 dots
    for rows in (1, 2, 5, FEW_ROWS + 1):
      x1 = jax.random.normal(next(key), (1, rows, 512))
      want = jnp.einsum("btd,dnh->btnh", x1, w1, precision="highest")
      np.testing.assert_allclose(project(x1, w1), want, rtol=2e-5, atol=2e-5)
      x2 = jnp.einsum("btd,dnh->btnh", x1, w1)
      want = jnp.einsum("btnh,nhd->btd", x2, w2, precision="highest")
      # fp32 sums in another order: errors scale with the largest partial sum, not each output
      np.testing.assert_allclose(project(x2, w2, 2), want, rtol=2e-5, atol=2e-6 * np.abs(want).max())
  xb, wb = x1[:, :1].astype(jnp.bfloat16), w1.astype(jnp.bfloat16)
  assert project(xb, wb).dtype == jnp.bfloat16
  assert project(xb, wb, out_dtype=jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_qkv_gives_the_same_logits(family):
  """The serving layout (one q/k/v kernel per layer that owns K/V, in blocks per tensor shard)
  gives the unfused model's logits, with a cache and on a decode step; CLA's shared layers keep q."""
  from hunyuan_jax.model.attention import fuse_qkv
  cfg = tiny(family)
  params = init_params(cfg, jax.random.key(0))
  fused = fuse_qkv(params)
  names = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(fused)}
  assert any(n.endswith("['qkv']") for n in names) and not any(n.endswith("['k']") for n in names)
  assert any(n.endswith("['q']") for n in names) == (family == "large")
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  for p in (params, fused):
    cache = init_cache(cfg, 2, 16, jnp.float32)
    out = forward(p, tokens[:, :8], pos[:, :8], cache, cfg=cfg)
    step = forward(p, tokens[:, 8:], pos[:, 8:], out.cache, cfg=cfg)
    if p is params:
      want = (out.logits, step.logits)
  # one wider fp32 dot sums in another order than three narrow ones (hy3 differs by ~2e-6)
  np.testing.assert_allclose(out.logits, want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(step.logits, want[1], rtol=1e-5, atol=1e-5)


def test_fused_qkv_blocks_follow_the_tensor_shards():
  """With 2 shards, block s holds q heads [s n/2, (s+1) n/2), then k and v heads of shard s."""
  from hunyuan_jax.model.attention import fuse_qkv, split_qkv
  cfg = tiny("a13b", num_layers=1)
  attn = init_params(cfg, jax.random.key(0))["groups_0"]["layer_0"]["attn"]
  q, k, v = attn["q"][0], attn["k"][0], attn["v"][0]            # [H, n, D], [H, kv, D]
  qkv = fuse_qkv({"attn": {"q": q, "k": k, "v": v}}, 2)["attn"]["qkv"]
  n, kv = cfg.num_heads, cfg.num_kv_heads
  assert qkv.shape == (cfg.hidden_size, 2, (n + 2 * kv) // 2, cfg.head_dim)
  np.testing.assert_array_equal(qkv[:, 1, : n // 2], q[:, n // 2:])
  np.testing.assert_array_equal(qkv[:, 1, n // 2: n // 2 + kv // 2], k[:, kv // 2:])
  x = jax.random.normal(jax.random.key(2), (1, 3, cfg.hidden_size))
  got = split_qkv(jnp.einsum("btd,dsgh->btsgh", x, qkv), n, kv)
  for g, w in zip(got, (q, k, v)):
    np.testing.assert_allclose(g, jnp.einsum("btd,dnh->btnh", x, w), rtol=1e-6, atol=1e-6)

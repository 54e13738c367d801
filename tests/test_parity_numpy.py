"""Hunyuan-Large CLA and the remote code's capacity gating vs the independent numpy spec model.

transformers has no class for either, so a float64 numpy implementation of HUNYUAN_SPEC.md 2.6
and 2.7 (tests/numpy_reference.py) is the ground truth. Weights are random, written in the Hub
layout with safetensors, and loaded through the project's own converter.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import numpy_reference as ref
from hunyuan_jax.checkpoint.hf import load_hf_checkpoint
from hunyuan_jax.model import forward


def _hf_config(**overrides):
  cfg = {"architectures": ["HunYuanForCausalLM"], "model_type": "hunyuan", "vocab_size": 101,
         "hidden_size": 48, "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2,
         "intermediate_size": 40, "num_experts": 4, "moe_topk": 1, "num_shared_expert": 1,
         "use_mixed_mlp_moe": True, "use_qk_norm": True, "use_cla": True, "cla_share_factor": 2,
         "rope_theta": 10000.0, "rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0},
         "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
         "hidden_act": "silu", "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
  cfg.update(overrides)
  return cfg


def _random_hub_weights(hf, rng):
  h, n, kvh = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
  d, f = h // n, hf["intermediate_size"]
  share = hf["cla_share_factor"] if hf["use_cla"] else 1

  def mat(*shape, scale=None):
    return (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(np.float32)

  def norm(size):  # not all ones, so a mixed-up norm weight would show
    return (1.0 + 0.2 * rng.standard_normal(size)).astype(np.float32)

  w = {"model.embed_tokens.weight": mat(hf["vocab_size"], h, scale=1.0), "model.norm.weight": norm(h)}
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    w.update({p + "input_layernorm.weight": norm(h), p + "post_attention_layernorm.weight": norm(h),
              p + "self_attn.q_proj.weight": mat(n * d, h), p + "self_attn.o_proj.weight": mat(h, n * d),
              p + "self_attn.query_layernorm.weight": norm(d), p + "self_attn.key_layernorm.weight": norm(d),
              p + "mlp.gate.wg.weight": mat(hf["num_experts"], h, scale=1.0)})
    if i % share == 0:  # Large: odd (cross) layers have no k/v projections
      w[p + "self_attn.k_proj.weight"] = mat(kvh * d, h)
      w[p + "self_attn.v_proj.weight"] = mat(kvh * d, h)
    for e in list(range(hf["num_experts"])):
      for name, shape in (("gate_proj", (f, h)), ("up_proj", (f, h)), ("down_proj", (h, f))):
        w[f"{p}mlp.experts.{e}.{name}.weight"] = mat(*shape)
    for name, shape in (("gate_proj", (f, h)), ("up_proj", (f, h)), ("down_proj", (h, f))):
      w[f"{p}mlp.shared_mlp.{name}.weight"] = mat(*shape)
  return w


def _write(tmp_path, hf, weights):
  (tmp_path / "config.json").write_text(json.dumps(hf))
  save_file(weights, str(tmp_path / "model.safetensors"))
  return str(tmp_path)


def _our_logits(path, tokens, **overrides):
  cfg, params = load_hf_checkpoint(path)
  cfg = cfg.replace(dtype="float32", **overrides)
  toks = jnp.asarray(tokens)[None]
  pos = jnp.arange(len(tokens))[None]
  return cfg, params, np.asarray(forward(params, toks, pos, cfg=cfg).logits[0], np.float64)


def _rel_err(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_large_cla_matches_numpy_spec(tmp_path):
  rng = np.random.default_rng(0)
  hf = _hf_config()
  weights = _random_hub_weights(hf, rng)
  tokens = rng.integers(0, hf["vocab_size"], 24)
  cfg, params, ours = _our_logits(_write(tmp_path, hf, weights), tokens)
  assert cfg.family == "large" and cfg.cla_share_factor == 2 and not cfg.router_renormalize
  assert "k" not in params["groups_0"]["layer_1"]["attn"], "cross layers must not own K/V weights"
  expected = ref.forward(tokens, weights, hf)
  assert _rel_err(ours, expected) <= 1e-5

  # The check can fail: ignoring CLA (cross layer using its own norm-free path) is detectably wrong.
  hf_no_share = dict(hf, use_cla=False)
  weights_no_share = dict(weights)
  for i in (1, 3):
    for kv in ("k_proj", "v_proj"):
      weights_no_share[f"model.layers.{i}.self_attn.{kv}.weight"] = weights[f"model.layers.{i-1}.self_attn.{kv}.weight"]
  other = ref.forward(tokens, weights_no_share, hf_no_share)
  assert _rel_err(other, expected) > 1e-3, "CLA K/V reuse must differ from recomputing K/V"


def test_large_cla_cached_decode_matches_full(tmp_path):
  rng = np.random.default_rng(1)
  hf = _hf_config()
  path = _write(tmp_path, hf, _random_hub_weights(hf, rng))
  cfg, params = load_hf_checkpoint(path)
  cfg = cfg.replace(dtype="float32")
  from hunyuan_jax.model import init_cache
  tokens = jnp.asarray(rng.integers(0, hf["vocab_size"], (2, 12)))
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  full = forward(params, tokens, pos, cfg=cfg).logits
  cache = init_cache(cfg, 2, 16, jnp.float32)
  assert len(cache) == 1 and cache["groups_0"].k_bsnd.shape[0] == 2, "one K/V per layer pair"
  out = forward(params, tokens[:, :7], pos[:, :7], cache, cfg=cfg)
  steps = [out.logits]
  cache = out.cache
  for t in range(7, 12):
    out = forward(params, tokens[:, t:t + 1], pos[:, t:t + 1], cache, cfg=cfg)
    steps.append(out.logits)
    cache = out.cache
  np.testing.assert_allclose(np.concatenate(steps, 1), full, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("num_tokens", [40, 96])
def test_capacity_mode_matches_tencent_gating(tmp_path, num_tokens):
  """A13B-style top-2 of 4 experts with the remote code's capacity limit (spec 2.7)."""
  rng = np.random.default_rng(2)
  hf = _hf_config(architectures=["HunYuanMoEV1ForCausalLM"], use_cla=False, moe_topk=2,
                  num_hidden_layers=2)
  weights = _random_hub_weights(hf, rng)
  # Skew the router so that some experts overflow their capacity.
  for i in range(2):
    weights[f"model.layers.{i}.mlp.gate.wg.weight"][0] += 0.8
  tokens = rng.integers(0, hf["vocab_size"], num_tokens)
  cfg, params, ours = _our_logits(_write(tmp_path, hf, weights), tokens, moe_capacity_factor=1.0)
  expected = ref.forward(tokens, weights, hf, capacity_factor=1.0)
  dropless = ref.forward(tokens, weights, hf, capacity_factor=0.0)
  assert _rel_err(dropless, expected) > 1e-4, "the skewed router must make the capacity limit drop tokens"
  assert _rel_err(ours, expected) <= 1e-5
  stats = forward(params, jnp.asarray(tokens)[None], jnp.arange(num_tokens)[None], cfg=cfg).moe_stats
  assert float(jnp.max(stats["groups_0"].dropped_frac)) > 0


@pytest.mark.parametrize("arch", ["a13b", "large"])
def test_fp8_experts_match_numpy_w8a8(tmp_path, arch):
  """The serving layout's fp8 experts (quant.fp8) = the numpy spec model with its routed experts'
  matmuls in W8A8 e4m3 (per-row activation and per-channel weight absmax scales), prefill and
  cached decode. The check can fail: the bf16-math model is far from it."""
  from hunyuan_jax.model import init_cache
  from hunyuan_jax.quant import quantize_experts
  rng = np.random.default_rng(3)
  hf = _hf_config() if arch == "large" else _hf_config(architectures=["HunYuanMoEV1ForCausalLM"],
                                                        use_cla=False, moe_topk=2)
  weights = _random_hub_weights(hf, rng)
  tokens = rng.integers(0, hf["vocab_size"], 20)
  path = _write(tmp_path, hf, weights)
  cfg, params, plain = _our_logits(path, tokens)
  q = quantize_experts(params)
  moe = q["groups_0"]["layer_0"]["moe"]
  assert moe["wi_fp8"].dtype == jnp.float8_e4m3fn and "wi" not in moe
  # the loader's host-side quantization, one layer at a time, gives the same arrays
  loaded = load_hf_checkpoint(path, quantization="fp8")[1]["groups_0"]["layer_0"]["moe"]
  assert loaded.keys() == moe.keys()
  for key in ("wi_fp8", "wi_scale", "wo_fp8", "wo_scale"):
    np.testing.assert_array_equal(np.asarray(loaded[key], np.float32), np.asarray(moe[key], np.float32))
  expected = ref.forward(tokens, weights, hf, fp8_experts=True)
  toks, pos = jnp.asarray(tokens)[None], jnp.arange(len(tokens))[None]
  ours = np.asarray(forward(q, toks, pos, cfg=cfg).logits[0], np.float64)
  assert _rel_err(ours, expected) <= 1e-5   # 4e-7 seen: the same roundings as float64
  assert _rel_err(plain, expected) > 10 * _rel_err(ours, expected), "fp8 must be detectable"
  cache = init_cache(cfg, 1, 32, jnp.float32)
  out = forward(q, toks[:, :12], pos[:, :12], cache, cfg=cfg)
  steps = [out.logits]
  for t in range(12, 20):
    out = forward(q, toks[:, t:t + 1], pos[:, t:t + 1], out.cache, cfg=cfg)
    steps.append(out.logits)
  assert _rel_err(np.concatenate(steps, 1)[0], expected) <= 1e-5

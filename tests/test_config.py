"""ModelConfig: presets, HF parsing of each format, validation messages, RoPE numbers."""
import numpy as np
import pytest

from hunyuan_jax.config import ModelConfig, load_preset, override_from_strings, parse_hf_config, read_config_json
from hunyuan_jax.model.layers import rope_inv_freq


def test_presets_have_the_published_shapes():
  a13b, large, hy3 = load_preset("a13b"), load_preset("large"), load_preset("hy3")
  assert (a13b.head_dim, a13b.num_experts, a13b.moe_top_k[0], a13b.shared_expert_size[0]) == (128, 64, 8, 3072)
  assert a13b.cla_share_factor == 1 and a13b.tie_word_embeddings and a13b.router_renormalize
  assert (large.head_dim, large.cla_share_factor, large.moe_top_k[0]) == (80, 2, 1)
  assert not large.router_renormalize and large.num_kv_layers == 32
  assert [len(p) * r for p, r in large.layer_groups()] == [64]
  assert hy3.qk_norm == "before_rope" and hy3.router_scoring == "sigmoid" and hy3.router_bias
  assert hy3.mlp_layer_types[0] == "dense" and set(hy3.mlp_layer_types[1:]) == {"moe"}
  assert [r for _, r in hy3.layer_groups()] == [1, 79] and not hy3.tie_word_embeddings
  assert hy3.num_mtp_layers == 1 and hy3.router_scale == pytest.approx(2.826)


def test_rope_numbers_from_the_spec():
  a13b = rope_inv_freq(load_preset("a13b"))
  np.testing.assert_allclose([a13b[1], a13b[63]], [0.77603436, 1.1547820e-07], rtol=1e-6)
  np.testing.assert_allclose(rope_inv_freq(load_preset("hy3"))[1], 0.77603436, rtol=1e-6)
  np.testing.assert_allclose(rope_inv_freq(load_preset("large"))[1], 0.66539097, rtol=1e-6)


def test_transformers_v5_style_config():
  hf = {"model_type": "hunyuan_v1_moe", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 48,
        "num_experts": 4, "moe_topk": [2, 2],
        "rope_parameters": {"rope_type": "dynamic", "alpha": 1000.0, "rope_theta": 10000.0},
        "tie_word_embeddings": True}
  cfg = ModelConfig.from_hf_config(hf)
  assert cfg.family == "a13b" and cfg.head_dim == 32 and cfg.rope_alpha == 1000.0
  assert cfg.moe_top_k == (2, 2) and cfg.shared_expert_size == (48, 48)


def test_errors_name_the_field():
  with pytest.raises(ValueError, match="moe_topk"):
    parse_hf_config({**read_config_json("a13b"), "moe_topk": [8] * 3})
  with pytest.raises(ValueError, match="hidden_act"):
    parse_hf_config({**read_config_json("a13b"), "hidden_act": "gelu"})
  with pytest.raises(ValueError, match="rope"):
    parse_hf_config({**read_config_json("a13b"), "rope_scaling": {"type": "yarn", "factor": 4.0}})
  with pytest.raises(ValueError, match="num_kv_heads"):
    load_preset("tiny", num_kv_heads=3)
  with pytest.raises(ValueError, match="Did you mean num_experts"):
    load_preset("tiny").replace(num_expert=4)
  with pytest.raises(FileNotFoundError, match="presets"):
    load_preset("no-such-model")


def test_string_overrides():
  cfg = override_from_strings(load_preset("tiny"), ["dtype=float32", "moe_capacity_factor=1.25"])
  assert cfg.dtype == "float32" and cfg.moe_capacity_factor == 1.25


def test_fewer_layers_by_override_keep_the_first_layers():
  """`--override=num_layers=7` on a preset with per-layer fields (benchmarks time a few layers):
  the per-layer fields follow; more layers than the preset has still asks for those fields."""
  hy3 = load_preset("hy3")
  cfg = override_from_strings(hy3, ["num_layers=3"])
  assert cfg.num_layers == 3 and cfg.mlp_layer_types == ("dense", "moe", "moe")
  assert cfg.moe_top_k == hy3.moe_top_k[:3] and cfg.shared_expert_size == hy3.shared_expert_size[:3]
  with pytest.raises(ValueError, match="mlp_layer_types: needs one entry per layer"):
    override_from_strings(hy3, [f"num_layers={hy3.num_layers + 1}"])

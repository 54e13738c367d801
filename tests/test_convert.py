"""Checkpoint conversion: bit-exact round trips, layouts, shards, mesh placement, errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_fixtures as fx  # noqa: E402
import tiny_configs  # noqa: E402
from hunyuan_jax.checkpoint import CheckpointMismatchError, load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from hunyuan_jax.checkpoint.orbax_io import restore_orbax, save_orbax  # noqa: E402
from hunyuan_jax.checkpoint.safetensors_io import SafetensorsReader  # noqa: E402
from hunyuan_jax.config import ModelConfig  # noqa: E402
from hunyuan_jax.convert import convert  # noqa: E402
from hunyuan_jax.model import abstract_params  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_all(path) -> dict[str, np.ndarray]:
  r = SafetensorsReader(path)
  return {n: r.read(n) for n in r.names()}


def assert_same_tensors(a_dir, b_dir):
  a, b = read_all(a_dir), read_all(b_dir)
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
    assert a[name].tobytes() == b[name].tobytes(), name


def write_variant(src_dir, out_dir, tensors, config_edit=None):
  os.makedirs(out_dir)
  with open(os.path.join(src_dir, "config.json")) as f:
    cfg = json.load(f)
  if config_edit:
    cfg.update(config_edit)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg, f)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  return out_dir


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp("convert")
  a13b, hy3 = fx.build_a13b(0), fx.build_hy3(1)
  out = {"root": root, "a13b_model": a13b,
         "a13b_hub": fx.save_hf(a13b, str(root / "a13b_hub")),
         "a13b_fused": fx.save_fused_v5(a13b, str(root / "a13b_fused")),
         "hy3_hub": fx.save_hf(hy3, str(root / "hy3_hub")),
         "hy3_fused": fx.save_fused_v5(hy3, str(root / "hy3_fused")),
         "a13b_sharded": fx.save_hf(a13b, str(root / "a13b_sharded"), max_shard_size="40KB")}
  # Mixed dtypes as in real files: bf16 weights, fp32 router / expert bias.
  mixed = {n: (t if ("router" in n or "expert_bias" in n) else t.astype(ml_dtypes.bfloat16))
           for n, t in read_all(out["hy3_hub"]).items()}
  out["hy3_mixed"] = write_variant(out["hy3_hub"], str(root / "hy3_mixed"), mixed)
  return out


@pytest.mark.parametrize("name,layout", [("a13b_hub", "hub"), ("hy3_hub", "hub"), ("hy3_mixed", "hub"),
                                         ("a13b_fused", "fused"), ("hy3_fused", "fused")])
def test_round_trip_hf_params_orbax_hf_is_bit_exact(ckpts, tmp_path, name, layout):
  cfg, params = load_hf_checkpoint(ckpts[name])
  save_orbax(params, str(tmp_path / "orbax"))
  restored = restore_orbax(str(tmp_path / "orbax"), cfg)
  save_hf_checkpoint(restored, cfg, str(tmp_path / "hf"), layout=layout)
  assert_same_tensors(ckpts[name], str(tmp_path / "hf"))
  reread = ModelConfig.from_pretrained(str(tmp_path / "hf"))
  assert reread.replace(param_dtype=cfg.param_dtype) == cfg


def test_keeps_file_dtype_per_tensor(ckpts):
  _, params = load_hf_checkpoint(ckpts["hy3_mixed"])
  assert params["embed"].dtype == ml_dtypes.bfloat16
  assert params["groups_1"]["layer_0"]["moe"]["expert_bias"].dtype == np.float32
  _, cast = load_hf_checkpoint(ckpts["hy3_hub"], dtype="bfloat16")
  assert cast["groups_1"]["layer_0"]["moe"]["wi"].dtype == ml_dtypes.bfloat16
  assert cast["groups_1"]["layer_0"]["moe"]["expert_bias"].dtype == np.float32  # fp32 buffer by rule


@pytest.mark.parametrize("name,layout", [("a13b_hub", "hub"), ("hy3_fused", "fused")])
def test_cli_streaming_round_trip(ckpts, tmp_path, name, layout):
  convert(from_hf=ckpts[name], to_orbax=str(tmp_path / "orbax"))
  cfg, params = load_hf_checkpoint(ckpts[name])
  restored = restore_orbax(str(tmp_path / "orbax"), cfg)  # the streamed writer's output is plain orbax
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, restored)
  convert(from_orbax=str(tmp_path / "orbax"), to_hf=str(tmp_path / "hf"), layout=layout, max_shard_bytes=30_000)
  assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")
  assert_same_tensors(ckpts[name], str(tmp_path / "hf"))


def test_v5_fused_to_hub_relayout(ckpts, tmp_path):
  convert(from_hf=ckpts["hy3_fused"], to_hf=str(tmp_path / "hub"), layout="hub")
  assert_same_tensors(ckpts["hy3_hub"], str(tmp_path / "hub"))


def test_sharded_checkpoint_with_index(ckpts, tmp_path):
  assert os.path.isfile(os.path.join(ckpts["a13b_sharded"], "model.safetensors.index.json"))
  _, sharded = load_hf_checkpoint(ckpts["a13b_sharded"])
  cfg, single = load_hf_checkpoint(ckpts["a13b_hub"])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded, single)
  files = save_hf_checkpoint(single, cfg, str(tmp_path / "out"), max_shard_bytes=40_000)
  assert len(files) > 2
  # transformers reads our sharded export and gets the original weights back.
  model = type(ckpts["a13b_model"]).from_pretrained(str(tmp_path / "out"))
  want = ckpts["a13b_model"].state_dict()
  for k, v in model.state_dict().items():
    torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)


def test_fused_qkv_and_gate_and_up_variants(ckpts, tmp_path):
  """Spec 3.4: qkv_proj interleaved per kv group (G q heads, k, v); gate_and_up_proj is [up; gate]."""
  cfg, hub = load_hf_checkpoint(ckpts["a13b_hub"])
  t = read_all(ckpts["a13b_hub"])
  n, kv, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
  g = n // kv
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    q = t.pop(p + "self_attn.q_proj.weight").reshape(kv, g, d, h)
    k = t.pop(p + "self_attn.k_proj.weight").reshape(kv, 1, d, h)
    v = t.pop(p + "self_attn.v_proj.weight").reshape(kv, 1, d, h)
    t[p + "self_attn.qkv_proj.weight"] = np.concatenate([q, k, v], axis=1).reshape(-1, h)
    gate, up = t.pop(p + "mlp.shared_mlp.gate_proj.weight"), t.pop(p + "mlp.shared_mlp.up_proj.weight")
    t[p + "mlp.shared_mlp.gate_and_up_proj.weight"] = np.concatenate([up, gate], axis=0)
    for e in range(cfg.num_experts):
      x = p + f"mlp.experts.{e}."
      gate, up = t.pop(x + "gate_proj.weight"), t.pop(x + "up_proj.weight")
      t[x + "gate_and_up_proj.weight"] = np.concatenate([up, gate], axis=0)
  _, fused = load_hf_checkpoint(write_variant(ckpts["a13b_hub"], str(tmp_path / "f"), t))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), fused, hub)


def test_large_cla_and_hy3_mtp_round_trip(tmp_path):
  """Large: odd layers have no k/v. Hy3: MTP at model.layers.{L}; its shared_head/embed_tokens are ignored."""
  for family in ("large", "hy3"):
    cfg = tiny_configs.tiny(family, intermediate_size=16)
    params = random_params(cfg)
    out = str(tmp_path / family)
    save_hf_checkpoint(params, cfg, out)
    names = set(SafetensorsReader(out).names())
    if family == "large":
      assert "model.layers.0.self_attn.k_proj.weight" in names
      assert "model.layers.1.self_attn.k_proj.weight" not in names
      assert "model.layers.1.self_attn.key_layernorm.weight" in names
    else:
      mtp = f"model.layers.{cfg.num_layers}."
      assert (mtp + "eh_proj.weight") in names and (mtp + "mlp.expert_bias") in names
      t = read_all(out)
      assert t[mtp + "eh_proj.weight"].shape == (cfg.hidden_size, 2 * cfg.hidden_size)
      t[mtp + "shared_head.norm.weight"] = np.ones(cfg.hidden_size, np.float32)
      t[mtp + "embed_tokens.weight"] = t["model.embed_tokens.weight"]
      os.remove(os.path.join(out, "model.safetensors"))
      save_file(t, os.path.join(out, "model.safetensors"))
    cfg2, loaded = load_hf_checkpoint(out)
    assert cfg2.replace(dtype=cfg.dtype) == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, params)


def random_params(cfg, seed=0):
  """Random numpy params of the right shapes (no model init: compiling it would dominate the test)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), abstract_params(cfg))


def _broken(ckpts, tmp_path, edit):
  t = read_all(ckpts["a13b_hub"])
  edit(t)
  return write_variant(ckpts["a13b_hub"], str(tmp_path / "broken"), t)


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape", "dtype"])
def test_errors_name_the_tensor(ckpts, tmp_path, case):
  name = "model.layers.1.mlp.experts.5.up_proj.weight"
  edits = {
      "missing": lambda t: t.pop(name),
      "unexpected": lambda t: t.__setitem__("model.layers.1.mlp.extra_gate.weight", np.zeros(3, np.float32)),
      "shape": lambda t: t.__setitem__(name, t[name][:-1]),
      "dtype": lambda t: t.__setitem__(name, t[name].astype(np.int32)),
  }
  path = _broken(ckpts, tmp_path, edits[case])
  with pytest.raises(CheckpointMismatchError) as err:
    load_hf_checkpoint(path)
  assert (name if case != "unexpected" else "model.layers.1.mlp.extra_gate.weight") in str(err.value)


def test_all_problems_reported_together(ckpts, tmp_path):
  def edit(t):
    t.pop("model.norm.weight")
    t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:, :3]
  with pytest.raises(CheckpointMismatchError) as err:
    load_hf_checkpoint(_broken(ckpts, tmp_path, edit))
  assert "model.norm.weight" in str(err.value) and "q_proj" in str(err.value)


def test_cli_usage_errors(ckpts, tmp_path):
  from absl import app
  with pytest.raises(app.UsageError, match="exactly one of --from_hf"):
    convert(to_orbax=str(tmp_path / "x"))
  with pytest.raises(app.UsageError, match="--config"):
    convert(from_orbax=str(tmp_path), to_hf=str(tmp_path / "y"))


@pytest.mark.parametrize("preset", ["a13b", "large", "hy3", "tiny"])
def test_hf_config_export_round_trips(preset):
  cfg = ModelConfig.from_pretrained(preset)
  assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


MESH_SCRIPT = textwrap.dedent("""
  import sys, numpy as np, jax
  from hunyuan_jax.checkpoint import load_hf_checkpoint
  from hunyuan_jax.checkpoint.orbax_io import restore_orbax, save_orbax
  from hunyuan_jax.sharding import make_mesh, param_shardings
  assert jax.device_count() == 8, jax.device_count()
  path, orbax_dir = sys.argv[1], sys.argv[2]
  mesh = make_mesh(fsdp=2, expert=2, tensor=2)
  cfg, host = load_hf_checkpoint(path)
  _, params = load_hf_checkpoint(path, mesh=mesh)
  want = param_shardings(cfg, mesh)
  def check(a, b, s):
    assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jax.tree.map(check, params, host, want)
  assert params["groups_1"]["layer_0"]["moe"]["wi"].sharding.spec[1] == "expert"
  save_orbax(params, orbax_dir)
  jax.tree.map(check, restore_orbax(orbax_dir, cfg, mesh), host, want)
  print("MESH_OK")
""")


def test_load_onto_8_device_mesh(ckpts, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, ckpts["hy3_hub"], str(tmp_path / "orbax")],
                        env=env, capture_output=True, text=True, timeout=300)
  assert "MESH_OK" in proc.stdout, proc.stderr[-3000:]

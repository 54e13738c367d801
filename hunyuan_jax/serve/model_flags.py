"""The model-loading flags and load sequence shared by `serve` and `generate`."""
from __future__ import annotations

import os

from absl import flags

FLAGS = flags.FLAGS


def define_model_flags() -> None:
  flags.DEFINE_string("model", None, "HF safetensors folder or orbax checkpoint folder")
  flags.DEFINE_string("config", None, "preset name or config.json (with --random_weights, or to override the folder's)")
  flags.DEFINE_bool("random_weights", False, "random parameters (tests, benchmarks)")
  flags.DEFINE_multi_string("override", [], "config field=value overrides, repeatable")
  flags.DEFINE_string("tokenizer", None, "tokenizer folder/file (default: the model folder; 'byte' for tiny)")
  flags.DEFINE_string("dtype", None, "compute and weight dtype, e.g. bfloat16")
  flags.DEFINE_integer("max_len", None, "context length per slot (default: max_position_embeddings)")
  flags.DEFINE_enum("quantization", "none", ["none", "fp8"],
                    "fp8: the routed experts in e4m3 (W8A8, per-channel weight and per-row activation scales), "
                    "quantized as they load: half their bytes on the device and per decode step")
  flags.DEFINE_integer("tensor", 1, "tensor-parallel devices")
  flags.DEFINE_integer("expert", 1, "expert-parallel devices")
  flags.DEFINE_string("compilation_cache_dir", "~/.cache/hunyuan_jax/jax",
                      "JAX's persistent compilation cache: a restart with the same model shapes loads its "
                      "programs instead of compiling them ('' turns it off)")


def load_from_flags():
  """-> (mesh, cfg, params, tokenizer) as the flags describe."""
  from hunyuan_jax.xla_flags import use_decode_xla_flags
  use_decode_xla_flags()   # before the backend starts (make_mesh_for_serving starts it)
  if FLAGS.compilation_cache_dir:
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache_dir))
  from hunyuan_jax.serve.loader import load_model, load_tokenizer_for, make_mesh_for_serving
  mesh = make_mesh_for_serving(FLAGS.tensor, FLAGS.expert)
  cfg, params = load_model(FLAGS.model, FLAGS.config, random_weights=FLAGS.random_weights,
                           overrides=FLAGS.override, dtype=FLAGS.dtype, mesh=mesh,
                           quantization=FLAGS.quantization)
  return mesh, cfg, params, load_tokenizer_for(FLAGS.model, FLAGS.tokenizer, cfg)

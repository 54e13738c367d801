"""Checkpoint conversion CLI, streamed one layer slice at a time (never the whole model in RAM).

  python -m hunyuan_jax.convert --from_hf=DIR --to_orbax=DIR          [--dtype=bfloat16]
  python -m hunyuan_jax.convert --from_orbax=DIR --to_hf=DIR          [--config=DIR|preset] [--layout=fused]
  python -m hunyuan_jax.convert --from_hf=DIR --to_hf=DIR --layout=hub   (re-layout, e.g. v5 fused -> Hub)

--to_orbax also writes the HF config.json into the orbax folder, so --from_orbax finds it without
--config. The orbax checkpoint restores with `hunyuan_jax.checkpoint.orbax_io.restore_orbax`.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("from_hf", None, "HF model folder: config.json + *.safetensors")
flags.DEFINE_string("from_orbax", None, "params-only orbax checkpoint folder")
flags.DEFINE_string("to_orbax", None, "output orbax checkpoint folder (must not exist)")
flags.DEFINE_string("to_hf", None, "output HF folder")
flags.DEFINE_string("config", None, "config.json folder/file or preset name (default: the input's config.json)")
flags.DEFINE_enum("layout", "hub", ["hub", "fused"], "HF export names: per-expert Hub, or transformers v5 fused")
flags.DEFINE_string("dtype", None, "cast float tensors (e.g. bfloat16) when reading HF; default keeps the file's")
flags.DEFINE_float("max_shard_gb", 5.0, "HF export shard size in GiB")


def _usage_error(msg: str) -> None:
  raise app.UsageError(msg + "\nUse --from_hf=DIR --to_orbax=DIR, or --from_orbax=DIR --to_hf=DIR "
                       "(see python -m hunyuan_jax.convert --help).")


def convert(from_hf=None, from_orbax=None, to_orbax=None, to_hf=None, config=None, layout="hub",
            dtype=None, max_shard_bytes=5 * 1024 ** 3) -> None:
  """The streaming conversion the CLI runs (callable from Python too)."""
  from hunyuan_jax.checkpoint.hf import HFSource, write_hf
  from hunyuan_jax.checkpoint.hf_config import to_hf_config
  from hunyuan_jax.checkpoint.orbax_io import OrbaxSource, write_orbax_streaming
  from hunyuan_jax.config import ModelConfig

  if bool(from_hf) == bool(from_orbax):
    _usage_error("give exactly one of --from_hf, --from_orbax")
  if bool(to_hf) == bool(to_orbax):
    _usage_error("give exactly one of --to_hf, --to_orbax")
  if from_orbax and to_orbax:
    _usage_error("orbax -> orbax is a copy; nothing to convert")
  source_dir = from_hf or from_orbax
  if not os.path.isdir(source_dir):
    _usage_error(f"input folder {source_dir!r} does not exist")
  config = config or source_dir
  try:
    cfg = ModelConfig.from_pretrained(config)
  except FileNotFoundError as e:
    _usage_error(f"{e} (for --from_orbax pass --config=DIR_or_preset)")
  if dtype and not from_hf:
    _usage_error("--dtype applies when reading HF safetensors only")
  src = HFSource(from_hf, cfg, dtype) if from_hf else OrbaxSource(from_orbax, cfg)
  if to_orbax:
    write_orbax_streaming(src, to_orbax)
    with open(os.path.join(to_orbax, "config.json"), "w") as f:
      json.dump(to_hf_config(cfg), f, indent=2)
  else:
    write_hf(src, to_hf, layout=layout, max_shard_bytes=max_shard_bytes)


def main(argv) -> None:
  if len(argv) > 1:
    _usage_error(f"unexpected arguments {argv[1:]}")
  from hunyuan_jax.checkpoint.hf import CheckpointMismatchError
  start = time.time()
  try:
    convert(FLAGS.from_hf, FLAGS.from_orbax, FLAGS.to_orbax, FLAGS.to_hf, FLAGS.config, FLAGS.layout,
            FLAGS.dtype, int(FLAGS.max_shard_gb * 1024 ** 3))
  except (CheckpointMismatchError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f"convert: {e}")
  print(f"converted {FLAGS.from_hf or FLAGS.from_orbax} -> {FLAGS.to_orbax or FLAGS.to_hf} "
        f"in {time.time() - start:.1f}s", file=sys.stderr)


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()

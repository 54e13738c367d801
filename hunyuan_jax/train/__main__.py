"""`python -m hunyuan_jax.train [--config=configs/train_tiny.json] [--config.a.b=value ...]`

With no flags: the tiny byte-level model on the Python standard library's source, on whatever
devices are present (a few minutes on a laptop CPU). See run_config.py for every field.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from hunyuan_jax.train.run_config import load_run_config, split_argv

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "configs")
DEFAULT_CONFIG = os.path.join(_CONFIGS, "train_tiny.json")

flags.DEFINE_string("run_dir", None, "Output folder (checkpoints, metrics); same as --config.run_dir.")
flags.DEFINE_string("data", None, "Text/jsonl/npy files, folder or glob; same as --config.data.path.")
flags.DEFINE_integer("steps", None, "Total steps; same as --config.steps.")
flags.DEFINE_bool("fresh", False, "Delete run_dir's checkpoints first instead of resuming from them.")

_PARSED: dict = {}


def _resolve(path):
  if path is None:
    return DEFAULT_CONFIG
  if not os.path.isfile(path) and os.path.isfile(os.path.join(_CONFIGS, f"{path}.json")):
    return os.path.join(_CONFIGS, f"{path}.json")
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; fields are set with --config.<field>=value")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  from hunyuan_jax.train.trainer import maybe_initialize_distributed
  from hunyuan_jax.xla_flags import use_train_xla_flags
  use_train_xla_flags()   # before the backend starts
  overrides = list(_PARSED["overrides"])
  for flag, key in (("run_dir", "run_dir"), ("data", "data.path"), ("steps", "steps")):
    if flags.FLAGS[flag].value is not None:
      overrides.append((key, str(flags.FLAGS[flag].value) if flag == "steps" else
                        f'"{flags.FLAGS[flag].value}"'))
  run_cfg = load_run_config(_PARSED["path"], overrides)
  maybe_initialize_distributed(run_cfg.distributed_timeout_s)  # before any backend is touched
  if flags.FLAGS.fresh:
    import shutil
    shutil.rmtree(os.path.join(run_cfg.run_dir, "checkpoints"), ignore_errors=True)
  from hunyuan_jax.train.trainer import train
  train(run_cfg)


def run():
  rest, path, overrides = split_argv(sys.argv[1:])
  _PARSED.update(path=_resolve(path), overrides=overrides)
  app.run(main, argv=[sys.argv[0]] + rest)


if __name__ == "__main__":
  run()

"""Memory proof for checkpoint conversion: peak RSS stays near one layer slice, not the model size.

Writes a synthetic Hub-layout checkpoint (A13B widths: hidden 4096, 32/8 heads x 128, expert
width 3072; fewer experts and layers so it fits this machine's disk and time), then runs the
CLI's streaming paths, each in a fresh process, and reports that process's peak RSS:
  HF -> orbax (write_orbax_streaming), orbax -> HF (OrbaxSource + write_hf), HF -> HF v5 fused.
A converter that held the model would peak at >= the checkpoint size.

  python experiments/convert_memory.py --workdir=/tmp/convert_memory --layers=4 --experts=16
Writes <workdir>/convert_memory.json and prints a table.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_string("workdir", "/tmp/convert_memory", "scratch folder (needs ~3.5x the checkpoint size)")
flags.DEFINE_integer("layers", 4, "decoder layers")
flags.DEFINE_integer("experts", 16, "experts per layer")
flags.DEFINE_integer("vocab", 32000, "vocabulary size")
flags.DEFINE_string("step", None, "internal: run one step in this process")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_cfg():
  from hunyuan_jax.config import ModelConfig
  n = FLAGS.layers
  return ModelConfig.from_pretrained("a13b").replace(
      num_layers=n, num_experts=FLAGS.experts, vocab_size=FLAGS.vocab, mlp_layer_types=("moe",) * n,
      moe_top_k=(8,) * n, moe_intermediate_size=(3072,) * n, shared_expert_size=(3072,) * n)


class SyntheticSource:
  """bf16 slices cut from one 64 MiB random pool (content is irrelevant to memory)."""

  def __init__(self, cfg):
    import ml_dtypes
    import numpy as np
    from hunyuan_jax.checkpoint.hf import flat_shapes
    self.cfg, self.shapes, self.np = cfg, flat_shapes(cfg), np
    self.bf16 = np.dtype(ml_dtypes.bfloat16)
    bits = np.random.default_rng(0).integers(0x3C00, 0x3F80, 32 * 1024 ** 2, dtype=np.uint16)  # |x| in ~[0.008, 1)
    self.pool = bits.view(self.bf16)

  def dtype(self, path):
    return self.bf16

  def read(self, sl):
    n = int(self.np.prod(sl.shape))
    reps = -(-n // self.pool.size)
    return self.np.tile(self.pool, reps)[:n].reshape(sl.shape) if reps > 1 else self.pool[:n].reshape(sl.shape).copy()


def run_step(step: str, work: str) -> dict:
  from hunyuan_jax.checkpoint.hf import write_hf
  from hunyuan_jax.convert import convert
  start = time.time()
  hub, orbax, back, fused = (os.path.join(work, x) for x in ("hf_hub", "orbax", "hf_back", "hf_fused"))
  if step == "baseline":  # imports only: the floor every step pays
    import jax  # noqa: F401
    import hunyuan_jax.checkpoint.orbax_io  # noqa: F401
  elif step == "write_synthetic":
    write_hf(SyntheticSource(synthetic_cfg()), hub, max_shard_bytes=1 << 30)
  elif step == "hf_to_orbax":
    convert(from_hf=hub, to_orbax=orbax)
  elif step == "orbax_to_hf":
    convert(from_orbax=orbax, to_hf=back, max_shard_bytes=1 << 30)
  elif step == "hf_to_hf_fused":
    convert(from_hf=hub, to_hf=fused, layout="fused", max_shard_bytes=1 << 30)
  return {"step": step, "seconds": round(time.time() - start, 1),
          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2}


def dir_gib(path: str) -> float:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 1024 ** 3


def main(argv):
  work = FLAGS.workdir
  if FLAGS.step:
    print("RESULT " + json.dumps(run_step(FLAGS.step, work)))
    return
  shutil.rmtree(work, ignore_errors=True)
  os.makedirs(work)
  results = []
  for step in ("baseline", "write_synthetic", "hf_to_orbax", "orbax_to_hf", "hf_to_hf_fused"):
    cmd = [sys.executable, os.path.abspath(__file__), f"--step={step}", f"--workdir={work}",
           f"--layers={FLAGS.layers}", f"--experts={FLAGS.experts}", f"--vocab={FLAGS.vocab}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    results.append(json.loads(out.split("RESULT ", 1)[1]))
    print(results[-1], flush=True)
  sizes = {"hf_checkpoint_gib": dir_gib(os.path.join(work, "hf_hub")),
           "orbax_gib": dir_gib(os.path.join(work, "orbax"))}
  import numpy as np  # largest slice: one layer's experts [E, H, 2, F] bf16
  slice_gib = FLAGS.experts * 4096 * 2 * 3072 * 2 / 1024 ** 3
  report = {"config": {"layers": FLAGS.layers, "experts": FLAGS.experts, "vocab": FLAGS.vocab,
                       "hidden": 4096, "expert_width": 3072, "dtype": "bfloat16"},
            **sizes, "largest_slice_gib": slice_gib, "steps": results}
  with open(os.path.join(work, "convert_memory.json"), "w") as f:
    json.dump(report, f, indent=2)
  print(f"\ncheckpoint {sizes['hf_checkpoint_gib']:.2f} GiB, largest layer slice {slice_gib:.2f} GiB")
  print(f"{'step':<18}{'peak RSS GiB':>14}{'seconds':>10}")
  for r in results:
    print(f"{r['step']:<18}{r['peak_rss_gib']:>14.2f}{r['seconds']:>10.1f}")
  del np


if __name__ == "__main__":
  app.run(main)

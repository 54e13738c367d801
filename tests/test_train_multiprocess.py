"""Multi-process training on one machine: 2 JAX processes x 2 CPU devices, collectives over gloo.

The same `python -m hunyuan_jax.train` command a multi-host job runs, with the environment a
launcher sets (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). The 2-process job is
preempted after step 2 and resumed (orbax saves and restores across both processes); its losses
must equal one process over 4 devices running straight through, on the same data x expert mesh.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/train_tiny.json", "--config.steps=3", "--config.log_every=1",
        "--config.batch_size=4", "--config.seq_len=64", "--config.mesh.data=2",
        "--config.mesh.fsdp=1", "--config.mesh.expert=2", "--config.checkpoint.every=2",
        "--config.sample_prompt="]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=ROOT, **extra)
  return env


def _train(run_dir, processes: int, *more):
  cmd = [sys.executable, "-m", "hunyuan_jax.train", *ARGS, f"--config.run_dir={run_dir}", *more]
  port = _free_port()
  procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(4 // processes, **({} if processes == 1 else dict(
                                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i)))))
           for i in range(processes)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


def _losses(run_dir) -> dict:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_two_processes_with_preemption_match_one_process(tmp_path):
  mp, sp = tmp_path / "two_processes", tmp_path / "one_process"
  logs = _train(mp, 2, "--config.stop_at_step=2")
  assert "over 4 cpu devices" in logs[0]            # both processes' devices form one mesh
  assert max(int(d) for d in os.listdir(mp / "checkpoints")) == 2   # (orbax also keeps its first save)
  logs = _train(mp, 2)                              # resumes at step 2 in both processes
  assert "resum" in logs[0].lower(), logs[0][-2000:]
  _train(sp, 1)
  two, one = _losses(mp), _losses(sp)
  assert sorted(two) == sorted(one) == [1, 2, 3]
  # gloo and in-process all-reduces sum in different orders: fp32 rounding only
  np.testing.assert_allclose([two[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=2e-5)

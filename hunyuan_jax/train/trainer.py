"""The training loop: mesh, state (fresh / resumed / from HF), data, jitted step, checkpoints, logs."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hunyuan_jax.config import dims_summary
from hunyuan_jax.model import abstract_params
from hunyuan_jax.model.greedy import greedy_generate
from hunyuan_jax.sharding import make_mesh
from hunyuan_jax.train import data as data_lib
from hunyuan_jax.train.checkpointing import Checkpointer, load_hf_params
from hunyuan_jax.train.metrics import Logger, datasheet_tflops, flops_per_token, progress_line
from hunyuan_jax.train.optimizer import make_optimizer
from hunyuan_jax.train.run_config import RunConfig
from hunyuan_jax.train.step import (BATCH_KEYS, abstract_state, batch_shardings, fresh_state, init_state,
                                    jit_train_step, state_shardings)


class NonFiniteLossError(FloatingPointError):
  pass


def maybe_initialize_distributed(timeout_s: int) -> bool:
  """jax.distributed.initialize() when the environment describes a multi-process job.

  Must run before anything touches a JAX backend. Recognised: JAX_COORDINATOR_ADDRESS (+
  JAX_NUM_PROCESSES, JAX_PROCESS_ID), MaxText's JAX_COORDINATOR_IP/PORT + NODE_RANK, SLURM with
  more than one task, and multi-host TPU slices (auto-detected by JAX).
  """
  env = os.environ
  kwargs = {}
  if "JAX_COORDINATOR_IP" in env:
    kwargs = dict(coordinator_address=f"{env['JAX_COORDINATOR_IP']}:{env.get('JAX_COORDINATOR_PORT', '1234')}",
                  num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["NODE_RANK"]))
  elif "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env:
    # jax.distributed.initialize does not read these two itself (cluster auto-detection aside)
    kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
  elif not ("JAX_COORDINATOR_ADDRESS" in env
            or int(env.get("SLURM_NTASKS", "1")) > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", "")
            or "MEGASCALE_COORDINATOR_ADDRESS" in env):
    return False
  jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
  return True


_COMPILED: dict = {}


def _compiled(run: RunConfig, cfg, mesh):
  """Optimizer, state shardings and jitted init/step, reused by later runs in this process."""
  key = (cfg, json.dumps([dataclasses.asdict(run.optim), dataclasses.asdict(run.moe)]), run.steps,
         run.grad_accum, tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat))
  if key not in _COMPILED:
    tx, lr_fn = make_optimizer(run.optim, cfg, abstract_params(cfg), run.steps)
    abstract = abstract_state(cfg, tx)
    shardings = state_shardings(abstract, cfg, mesh)
    step_fn = jit_train_step(cfg, run.moe, tx, lr_fn, run.grad_accum, mesh, shardings)
    init_fn = jax.jit(lambda rng: fresh_state(cfg, tx, rng), out_shardings=shardings)
    _COMPILED.clear()  # keep only the latest
    _COMPILED[key] = (tx, lr_fn, abstract, shardings, step_fn, init_fn)
  return _COMPILED[key]


def _put_batch(batch: dict, shardings: dict) -> dict:
  batch = {k: batch[k] for k in shardings}
  if jax.process_count() == 1:
    return jax.device_put(batch, shardings)
  # Every process builds the same global batch and hands over the rows its devices hold.
  n, i = jax.process_count(), jax.process_index()
  rows = lambda x: x[i * x.shape[0] // n:(i + 1) * x.shape[0] // n]
  return {k: jax.make_array_from_process_local_data(shardings[k], rows(v)) for k, v in batch.items()}


def train(run: RunConfig, log: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) `run`; returns {"losses": {step: loss}, "wall_s", "start_step", ...}."""
  t_start = time.time()
  cfg = run.model_config()
  mesh = make_mesh(**dataclasses.asdict(run.mesh))
  is_main = jax.process_index() == 0
  say = log if is_main else (lambda _: None)
  say(f"model {dims_summary(cfg)}; dtype {cfg.dtype}, params {cfg.param_dtype}")
  say(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices")

  tokenizer = data_lib.pick_tokenizer(cfg.vocab_size, run.data.tokenizer, run.model)
  files = data_lib.resolve_files(run.data.path)
  batches = data_lib.PackedBatches(files, tokenizer, run.batch_size, run.seq_len,
                                   seed=run.data.seed, field=run.data.field)
  say(f"data: {len(files)} files ({'Python stdlib' if not run.data.path else run.data.path}), "
      f"batch {run.batch_size} x {run.seq_len} tokens, {run.grad_accum} microbatch(es)")

  tx, lr_fn, abstract, shardings, step_fn, init_fn = _compiled(run, cfg, mesh)
  ckpt = Checkpointer(run.run_dir, run.checkpoint.every, run.checkpoint.keep,
                      run.checkpoint.async_save)
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = ckpt.restore(abstract, shardings, latest)
    batches.restore(data_state)
    say(f"resumed from {ckpt.directory}/{latest}")
  elif run.checkpoint.init_from_hf:
    params = load_hf_params(run.checkpoint.init_from_hf, cfg, mesh, dtype=cfg.param_dtype)
    state = init_state(cfg, tx, None, shardings, params=params)
    say(f"initialised params from {run.checkpoint.init_from_hf}")
  else:
    state = init_fn(jax.random.key(run.seed))

  b_sh = batch_shardings(mesh, BATCH_KEYS)
  tokens_per_step = run.batch_size * run.seq_len
  flops_step = flops_per_token(cfg, run.seq_len) * tokens_per_step
  peak = (run.peak_tflops or datasheet_tflops()) * 1e12 * jax.device_count()
  logger = Logger(run.run_dir, enabled=is_main)

  start_step = int(jax.device_get(state["step"]))
  if start_step >= run.steps:
    say(f"{run.run_dir} already holds step {start_step} of {run.steps}: nothing to do. Pass --fresh "
        "to start over, a new --run_dir, or more --steps to continue.")
  losses: dict[int, float] = {}
  window_t, window_steps = None, 0
  end = min(run.steps, run.stop_at_step) if run.stop_at_step > 0 else run.steps
  try:
    for step in range(start_step, end):
      data_before = batches.get_state()
      batch = _put_batch(next(batches), b_sh)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, m = step_fn(state, batch)
      m = jax.device_get(m)
      if not bool(m["finite"]):
        # The step left the state unchanged: save it as the last good one, then stop.
        if ckpt.latest_step() != step:
          ckpt.maybe_save(step, state, data_before, force=True)
        ckpt.wait()
        raise NonFiniteLossError(
            f"step {step + 1}: loss {float(m['total_loss'])} / grad norm {float(m['grad_norm'])} is "
            f"not finite; stopped. The last good state (step {step}) is in {ckpt.directory}. "
            "Lower optim.lr, raise optim.warmup_steps or set optim.clip_norm, then resume.")
      losses[step + 1] = float(m["loss"])
      ckpt.maybe_save(step + 1, state, batches.get_state())
      now = time.time()
      if window_t is None:       # the first step compiles: time from its end
        window_t = now
      else:
        window_steps += 1
      if (step + 1) % run.log_every == 0 or step + 1 == end:
        dt = (now - window_t) / window_steps if window_steps else float("nan")
        tok_s = tokens_per_step / dt if window_steps else 0.0
        mfu = flops_step / (dt * peak) if (peak and window_steps) else None
        scalars = {k: m[k] for k in ("loss", "total_loss", "aux_loss", "z_loss", "dropped_frac",
                                     "grad_norm", "lr")}
        if "mtp_loss" in m:
          scalars["mtp_loss"] = m["mtp_loss"]
        # Packed batches differ a lot in difficulty: print the window's mean loss too.
        scalars["loss_window_mean"] = np.mean([losses[s] for s in range(step + 2 - run.log_every, step + 2)
                                               if s in losses])
        if window_steps:   # none yet when only the compiling first step is in the window
          scalars.update({"perf/tokens_per_s": tok_s, "perf/step_time_s": dt})
        if mfu is not None:
          scalars["perf/mfu"] = mfu
        logger.scalars(step + 1, scalars, np.asarray(m["load"]))
        say(progress_line(step + 1, run.steps, {k: float(v) for k, v in scalars.items()},
                          tok_s, mfu, dt))
        window_t, window_steps = now, 0
    if end == run.steps and ckpt.latest_step() != run.steps and run.checkpoint.every > 0:
      ckpt.maybe_save(run.steps, state, batches.get_state(), force=True)
  finally:
    ckpt.close()
    logger.close()
  wall = time.time() - t_start
  if losses:
    first, last = min(losses), max(losses)
    tail = [losses[s] for s in range(max(first, last - 9), last + 1)]
    say(f"done: loss {losses[first]:.4f} at step {first} -> {np.mean(tail):.4f} (mean of steps "
        f"{last - len(tail) + 1}-{last}) in {wall:.1f} s wall")
  if is_main and run.sample_prompt and run.sample_tokens > 0:
    say(f"sample: {run.sample_prompt + greedy_sample(state['params'], cfg, tokenizer, run):s}")
  return {"losses": losses, "wall_s": wall, "start_step": start_step, "state": state}


def greedy_sample(params, cfg, tokenizer, run: RunConfig) -> str:
  """A short greedy continuation of `run.sample_prompt` with the trained weights."""
  prompt = jnp.asarray([tokenizer.encode(run.sample_prompt, allow_special=False)], jnp.int32)
  tokens = greedy_generate(params, prompt, cfg=cfg, max_new_tokens=run.sample_tokens)
  return tokenizer.decode([int(t) for t in np.asarray(tokens[0])])

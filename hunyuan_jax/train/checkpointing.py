"""Orbax checkpoints of the train state and the data iterator position.

Layout: <run_dir>/checkpoints/<step>/{state, data}. `state` is the full train state (params,
optimizer, step), `data` the iterator position (JSON). Saves are async and atomic (orbax writes
to a temporary folder and renames it), every N steps, keeping the last K. Restore always goes
into the *target* shardings given by the caller, so a run may resume on a different mesh.

Resume order (MaxText's): the run folder's latest checkpoint if there is one; otherwise
`init_from_hf` (a converted HF checkpoint: params only, fresh optimizer); otherwise fresh init.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, run_dir: str, every: int, keep: int, async_save: bool = True):
    self.every = every
    self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(every, 1),
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def maybe_save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
    if self.every <= 0 and not force:
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
    return self.manager.save(step, args=args, force=force)

  def restore(self, abstract_state: Any, shardings: Any, step: Optional[int] = None):
    """(state placed in `shardings`, data iterator state) of `step` (default: the latest)."""
    step = self.latest_step() if step is None else step
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def load_hf_params(path: str, cfg, mesh, dtype: str = "float32"):
  """Params of an HF checkpoint folder, cast to `dtype` (the master weights), placed on `mesh`."""
  try:
    from hunyuan_jax.checkpoint.hf import load_hf_checkpoint
  except ImportError as e:
    raise RuntimeError(
        f"--config.checkpoint.init_from_hf={path}: hunyuan_jax.checkpoint.hf.load_hf_checkpoint "
        f"is not available ({e}); convert the checkpoint first or start from scratch") from e
  _, params = load_hf_checkpoint(path, cfg, mesh=mesh, dtype=dtype)
  return params

"""RunConfig: everything about a training run that is not the model, plus CLI overrides.

A run preset is a JSON file (configs/train_*.json) with the sections below; the model is a
preset name or a path (`"model": "tiny"`) plus `"model_overrides"` of ModelConfig fields.
The command line overrides any field with a dotted path (MaxText / ml_collections style):

    --config=configs/train_tiny.json --config.steps=500 --config.optim.lr=3e-3
    --config.model.remat_policy=full --mesh.data=2 --mesh.expert=4

`--config.model.<field>` is a ModelConfig field, `--mesh.<axis>` is `--config.mesh.<axis>`.
Values are parsed as JSON when they parse (numbers, true/false, lists), else kept as strings.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from typing import Any, Optional, Sequence

from hunyuan_jax.config import ModelConfig, read_config_json


@dataclasses.dataclass
class MeshConfig:
  data: int = 1
  fsdp: int = -1       # -1: the devices left over by the other axes
  expert: int = 1
  tensor: int = 1


@dataclasses.dataclass
class OptimConfig:
  lr: float = 3e-3
  warmup_steps: int = 50
  decay: str = "cosine"            # "cosine", "linear" or "constant" after warmup
  min_lr_ratio: float = 0.1        # final lr = lr * min_lr_ratio
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1        # decoupled; not applied to norms, biases, 1-D params
  clip_norm: float = 1.0           # global-norm gradient clipping; 0 = off
  expert_lr_scale: Any = 1.0       # routed experts' lr multiplier; "auto" = sqrt(top_k / num_experts)
  shared_expert_lr_scale: float = 1.0
  mu_dtype: Optional[str] = None   # Adam first moment dtype (None: the params' dtype)


@dataclasses.dataclass
class MoETrainConfig:
  aux_loss_weight: float = 0.01    # Switch load-balancing loss, E * sum_e frac_e * prob_e, per layer
  z_loss_weight: float = 0.001     # router z-loss, mean logsumexp(logits)^2
  bias_update_rate: float = 0.0    # Hy3 aux-loss-free balancing: expert_bias += rate * sign(mean - load)
  mtp_loss_weight: float = 0.0     # Hy3 multi-token prediction: weight of the MTP layers' loss on token t+2


@dataclasses.dataclass
class DataConfig:
  path: Optional[str] = None       # None: the Python standard library's source (the embedded default)
  tokenizer: Optional[str] = None  # None: byte-level for vocab 272, else the model folder
  seed: int = 0
  field: str = "text"              # jsonl key holding the document


@dataclasses.dataclass
class CheckpointConfig:
  every: int = 100                 # save every N steps (and at the end); 0 = never
  keep: int = 3                    # keep the last K
  async_save: bool = True
  init_from_hf: Optional[str] = None   # converted HF checkpoint folder: params only, fresh optimizer


@dataclasses.dataclass
class RunConfig:
  model: str = "tiny"
  model_overrides: dict = dataclasses.field(default_factory=dict)
  run_dir: str = "runs/tiny"
  steps: int = 300
  batch_size: int = 16             # global sequences per step (all microbatches together)
  seq_len: int = 256
  grad_accum: int = 1              # microbatches per step
  seed: int = 0
  log_every: int = 10
  stop_at_step: int = 0            # >0: stop after this step as if preempted (no final save)
  peak_tflops: float = 0.0         # per device, for MFU; 0: datasheet value when known
  distributed_timeout_s: int = 1800
  sample_prompt: str = "def "      # greedy continuation printed after training ("" = none)
  sample_tokens: int = 64
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  moe: MoETrainConfig = dataclasses.field(default_factory=MoETrainConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

  def model_config(self) -> ModelConfig:
    return ModelConfig.from_hf_config(read_config_json(self.model)).replace(**self.model_overrides)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _set(obj, path: Sequence[str], value, full: str):
  head, rest = path[0], path[1:]
  if isinstance(obj, RunConfig) and head == "model" and rest:
    if len(rest) != 1:
      raise ValueError(f"--config.{full}: model fields are flat, e.g. --config.model.hidden_size=256")
    model_fields = [f.name for f in dataclasses.fields(ModelConfig)]
    if rest[0] not in model_fields:
      close = difflib.get_close_matches(rest[0], model_fields, n=3)
      hint = f" Did you mean {', '.join(close)}?" if close else ""
      raise ValueError(f"--config.{full}: ModelConfig has no field {rest[0]!r}.{hint}")
    obj.model_overrides[rest[0]] = value
    return
  names = [f.name for f in dataclasses.fields(obj)]
  if head not in names:
    close = difflib.get_close_matches(head, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"--config.{full}: {type(obj).__name__} has no field {head!r}.{hint}")
  current = getattr(obj, head)
  if rest:
    if not dataclasses.is_dataclass(current):
      raise ValueError(f"--config.{full}: {head!r} is a value, not a section")
    _set(current, rest, value, full)
  elif dataclasses.is_dataclass(current):
    if not isinstance(value, dict):
      raise ValueError(f"--config.{full}: section {head!r} needs an object")
    for k, v in value.items():
      _set(current, [k], v, f"{full}.{k}")
  else:
    setattr(obj, head, value)


def _parse_value(raw: str):
  try:
    return json.loads(raw)
  except json.JSONDecodeError:
    return raw


def load_run_config(path: Optional[str], overrides: Sequence[tuple[str, str]] = ()) -> RunConfig:
  """A RunConfig from a preset file (or the defaults) and dotted `(path, value)` overrides."""
  run = RunConfig()
  if path:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--config={path}: no such run preset; see configs/train_*.json")
    with open(path) as f:
      for key, value in json.load(f).items():
        _set(run, [key], value, key)
  for key, raw in overrides:
    _set(run, key.split("."), _parse_value(raw) if isinstance(raw, str) else raw, key)
  run.model_config()  # validate the model now, with ModelConfig's messages
  if run.batch_size % run.grad_accum:
    raise ValueError(f"batch_size={run.batch_size} must be a multiple of grad_accum={run.grad_accum}")
  if run.optim.decay not in ("cosine", "linear", "constant"):
    raise ValueError(f"optim.decay={run.optim.decay!r} is not cosine, linear or constant")
  return run


def split_argv(argv: Sequence[str]) -> tuple[list[str], Optional[str], list[tuple[str, str]]]:
  """Separates `--config=...`, `--config.x=...` and `--mesh.x=...` from the other (absl) flags."""
  rest, path, overrides = [], None, []
  it = iter(argv)
  for arg in it:
    for prefix in ("--config.", "--mesh."):
      if arg.startswith(prefix):
        key, sep, value = arg[2:].partition("=")
        if not sep:
          value = next(it, None)
          if value is None:
            raise ValueError(f"{arg} needs a value ({arg}=VALUE)")
        key = key[len("config."):] if key.startswith("config.") else key
        overrides.append((key, value))
        break
    else:
      if arg.startswith("--config="):
        path = arg.split("=", 1)[1]
      elif arg == "--config":
        path = next(it, None)
      else:
        rest.append(arg)
  return rest, path, overrides

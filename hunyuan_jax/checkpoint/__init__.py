"""Checkpoints: HF safetensors <-> params (streamed), orbax save/restore."""
from hunyuan_jax.checkpoint.hf import (CheckpointMismatchError, HFSource, ParamsSource, load_hf_checkpoint,
                                       save_hf_checkpoint, write_hf)

__all__ = ["CheckpointMismatchError", "HFSource", "ParamsSource", "load_hf_checkpoint", "save_hf_checkpoint",
           "write_hf"]

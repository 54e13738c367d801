"""Model, tokenizer and engine from command-line style options (shared by serve, generate, benchmarks)."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import jax

from hunyuan_jax.config import ModelConfig, override_from_strings
from hunyuan_jax.serve.engine import Engine, generation_defaults

CHAT_FAMILY = {"a13b": "a13b", "dense": "a13b", "large": "large", "hy3": "hy3"}


def make_mesh_for_serving(tensor: int = 1, expert: int = 1):
  """Tensor x expert parallel over the local devices (data axis takes what is left)."""
  from hunyuan_jax.sharding import make_mesh
  if tensor * expert == 1 and len(jax.devices()) == 1:
    return None
  return make_mesh(data=-1, expert=expert, tensor=tensor)


def load_model(model: Optional[str], config: Optional[str] = None, *, random_weights: bool = False,
               overrides: Sequence[str] = (), dtype: Optional[str] = None, mesh=None, seed: int = 0,
               quantization: str = "none"):
  """-> (cfg, params). `model` is an HF safetensors folder or an orbax checkpoint folder;
  `random_weights` with `config` (preset name or config.json path) is for tests and benchmarks.
  quantization "fp8": the routed experts in e4m3 (hunyuan_jax.quant.fp8), quantized as they
  load, so the model's bf16 experts never have to fit the device."""
  from hunyuan_jax.quant import QUANTIZATIONS, quantize_experts
  if quantization not in QUANTIZATIONS:
    raise ValueError(f"--quantization={quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
  if random_weights or model is None:
    if not config:
      raise ValueError("pass --model=<folder>, or --random_weights with --config=<preset or config.json>")
    cfg = ModelConfig.from_pretrained(config)
    cfg = override_from_strings(cfg, list(overrides))
    if dtype:
      cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    return cfg, random_params(cfg, mesh, seed, quantization)
  if not os.path.isdir(model):
    raise FileNotFoundError(f"--model={model!r} is not a folder; pass an HF safetensors folder or an orbax checkpoint")
  cfg = ModelConfig.from_pretrained(config or model)
  cfg = override_from_strings(cfg, list(overrides))
  if any(f.endswith(".safetensors") for f in os.listdir(model)):
    from hunyuan_jax.checkpoint import load_hf_checkpoint
    cfg, params = load_hf_checkpoint(model, cfg, mesh=mesh, dtype=dtype, quantization=quantization)
  else:
    from hunyuan_jax.checkpoint.orbax_io import restore_orbax
    params = quantize_experts(restore_orbax(model, cfg, mesh), quantization)
  if dtype:
    cfg = cfg.replace(dtype=dtype)
  return cfg, params


def random_params(cfg: ModelConfig, mesh, seed: int, quantization: str = "none"):
  from hunyuan_jax.model import init_params
  init = jax.jit(init_params, static_argnums=0)
  shardings = None
  if mesh is not None:
    from hunyuan_jax.sharding import param_shardings
    shardings = param_shardings(cfg, mesh)
    init = jax.jit(init_params, static_argnums=0, out_shardings=shardings)
  if quantization in (None, "", "none"):
    return init(cfg, jax.random.key(seed))
  from hunyuan_jax.quant.fp8 import random_fp8_experts
  return random_fp8_experts(cfg, init_params, jax.random.key(seed), shardings)


def load_tokenizer_for(model: Optional[str], tokenizer: Optional[str], cfg: ModelConfig):
  """--tokenizer wins; else the model folder; a random-weights model with a 272-token vocab uses bytes."""
  from hunyuan_jax.tokenizer import ByteTokenizer, load_tokenizer
  path = tokenizer or model
  if path:
    return load_tokenizer(path)
  if cfg.vocab_size == ByteTokenizer().vocab_size:
    return ByteTokenizer()
  raise ValueError(f"no tokenizer for a vocabulary of {cfg.vocab_size}; pass --tokenizer=<folder or hy.tiktoken>")


def chat_family_for(cfg: ModelConfig, tok) -> str:
  from hunyuan_jax.chat import hy3_family_for
  from hunyuan_jax.tokenizer import ByteTokenizer
  if isinstance(tok, ByteTokenizer):
    return "tiny"
  if cfg.family == "hy3":
    return hy3_family_for(tok)
  return CHAT_FAMILY[cfg.family]


def build_engine(cfg, params, tok, *, model_dir=None, max_slots=8, max_len=None, prefill_chunk=512,
                 kv_block=256, mesh=None, prefix_caching=True) -> tuple[Engine, dict]:
  """-> (engine, sampling defaults from generation_config.json)."""
  eng = Engine(cfg, params, max_slots=max_slots, max_len=max_len or cfg.max_position_embeddings,
               prefill_chunk=prefill_chunk, kv_block=kv_block, tokenizer=tok, mesh=mesh,
               prefix_caching=prefix_caching)
  return eng, generation_defaults(model_dir)

"""HF safetensors names <-> params tree, one layer slice at a time (HUNYUAN_SPEC.md section 3).

The unit of conversion is a `Slice`: one decoder layer's part of one stacked (scanned) param, or a
whole unstacked param. Import rules list alternatives (hub per-expert names, transformers v5 fused
experts, fused `qkv_proj` / `gate_and_up_proj`, Hy3 inner and transformers names); each alternative
names its source tensors with their expected PyTorch [out, in] shapes and fills a preallocated
output slice reading one source tensor at a time. Export rules are the inverse for one layout.

    params path                        HF name (hub layout)                      transform
    embed [V, H]                       model.embed_tokens.weight [V, H]          as is
    lm_head [V, H] (untied only)       lm_head.weight [V, H]                     as is
    groups_g/layer_j/attn/q [H, n, D]  model.layers.i.self_attn.q_proj [nD, H]   .T, split heads
    .../attn/o [n, D, H]               self_attn.o_proj [H, nD]                  .T, split heads
    .../moe/wi [E, H, 2, F]            mlp.experts.e.{gate,up}_proj [F, H]       .T, stack (0 = gate)
    .../moe/router [H, E]              mlp.gate.wg / mlp.router.gate [E, H]      .T
    mtp_0/eh_proj [2H, H]              model.layers.L.eh_proj [H, 2H]            .T
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

import numpy as np

from hunyuan_jax.config import ModelConfig

Get = Callable[[str], np.ndarray]           # reads one source tensor by name
Fill = Callable[[np.ndarray, Get], None]    # writes one slice into a preallocated buffer
LAYOUTS = ("hub", "fused")                  # export layouts: per-expert Hub names, transformers v5 fused


@dataclasses.dataclass(frozen=True)
class Slice:
  """One conversion unit: layer `layer` of param `path` (position `index` on its stacked axis)."""
  path: tuple[str, ...]
  index: Optional[int]        # None: the param is not stacked
  layer: Optional[int]        # HF layer number (MTP layers continue after the last decoder layer)
  rel: tuple[str, ...]        # path inside the decoder layer / MTP block / model top level
  scope: str                  # "layer", "mtp" or "top"
  shape: tuple[int, ...]      # shape of this slice in the params tree


@dataclasses.dataclass(frozen=True)
class Alternative:
  sources: dict[str, tuple[int, ...]]   # HF name -> expected shape
  fill: Fill


def path_str(path: tuple[str, ...]) -> str:
  return "/".join(path)


# ---------------------------------------------------------------------------------------------
# Which slices make up the params tree
# ---------------------------------------------------------------------------------------------
def group_layers(cfg: ModelConfig) -> dict[tuple[int, int], list[int]]:
  """(group, pattern position) -> HF layer numbers, in stacked order."""
  out, start = {}, 0
  for g, (pattern, repeats) in enumerate(cfg.layer_groups()):
    for j in range(len(pattern)):
      out[(g, j)] = [start + r * len(pattern) + j for r in range(repeats)]
    start += len(pattern) * repeats
  return out


def param_slices(cfg: ModelConfig, path: tuple[str, ...], shape: tuple[int, ...]) -> list[Slice]:
  """The slices of one param leaf, in stacked order."""
  head = path[0]
  if head.startswith("groups_"):
    layers = group_layers(cfg)[(int(head.split("_")[1]), int(path[1].split("_")[1]))]
    return [Slice(path, r, i, path[2:], "layer", tuple(shape[1:])) for r, i in enumerate(layers)]
  if head.startswith("mtp_"):
    layer = cfg.num_layers + int(head.split("_")[1])
    if path[1] == "layer":
      return [Slice(path, None, layer, path[2:], "layer", tuple(shape))]
    return [Slice(path, None, layer, path[1:], "mtp", tuple(shape))]
  return [Slice(path, None, None, path, "top", tuple(shape))]


# ---------------------------------------------------------------------------------------------
# Import: alternatives per slice
# ---------------------------------------------------------------------------------------------
def _t(out: np.ndarray, w: np.ndarray, shape) -> None:
  out[...] = w.T.reshape(shape)


def _linear(name: str, torch_shape, out_shape) -> list[Alternative]:
  return [Alternative({name: tuple(torch_shape)}, lambda out, get: _t(out, get(name), out_shape))]


def _as_is(names: list[str], shape) -> list[Alternative]:
  def make(name):
    return Alternative({name: tuple(shape)}, lambda out, get: out.__setitem__(Ellipsis, get(name)))
  return [make(n) for n in names]


def _swiglu_in(bases: list[str], h: int, f: int) -> list[Alternative]:
  """wi [H, 2, F] (0 = gate, 1 = up) from gate/up, or from fused gate_and_up_proj (UP first, spec 3.4)."""
  alts = []
  for base in bases:
    gate, up, fused = base + "gate_proj.weight", base + "up_proj.weight", base + "gate_and_up_proj.weight"

    def split(out, get, gate=gate, up=up):
      out[:, 0, :] = get(gate).T
      out[:, 1, :] = get(up).T

    def fused_fill(out, get, fused=fused):
      w = get(fused)
      out[:, 1, :] = w[:f].T
      out[:, 0, :] = w[f:].T

    alts += [Alternative({gate: (f, h), up: (f, h)}, split), Alternative({fused: (2 * f, h)}, fused_fill)]
  return alts


def _qkv(p: str, cfg: ModelConfig, which: str) -> Alternative:
  """Fused qkv_proj [(n + 2 kv) D, H] = [kv, G + 2, D, H]: per kv group G q heads, then k, then v."""
  n, kv, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
  g = n // kv
  name = p + "self_attn.qkv_proj.weight"

  def fill(out, get):
    w = get(name).reshape(kv, g + 2, d, h)
    if which == "q":
      out[...] = w[:, :g].reshape(n, d, h).transpose(2, 0, 1)
    else:
      out[...] = w[:, g if which == "k" else g + 1].transpose(2, 0, 1)

  return Alternative({name: ((n + 2 * kv) * d, h)}, fill)


def _experts_in(p: str, e: int, h: int, f: int) -> list[Alternative]:
  names = {x: [f"{p}mlp.experts.{i}.{x}.weight" for i in range(e)]
           for x in ("gate_proj", "up_proj", "gate_and_up_proj")}

  def per_expert(out, get):
    for i in range(e):
      out[i, :, 0, :] = get(names["gate_proj"][i]).T
      out[i, :, 1, :] = get(names["up_proj"][i]).T

  def per_expert_fused(out, get):  # gate_and_up_proj: up first
    for i in range(e):
      w = get(names["gate_and_up_proj"][i])
      out[i, :, 1, :] = w[:f].T
      out[i, :, 0, :] = w[f:].T

  v5 = p + "mlp.experts.gate_up_proj"

  def fused_v5(out, get):  # transformers v5: [E, 2F, H], gate rows first
    w = get(v5)
    out[:, :, 0, :] = w[:, :f].transpose(0, 2, 1)
    out[:, :, 1, :] = w[:, f:].transpose(0, 2, 1)

  return [
      Alternative({n: (f, h) for n in names["gate_proj"] + names["up_proj"]}, per_expert),
      Alternative({n: (2 * f, h) for n in names["gate_and_up_proj"]}, per_expert_fused),
      Alternative({v5: (e, 2 * f, h)}, fused_v5),
  ]


def _experts_out(p: str, e: int, h: int, f: int) -> list[Alternative]:
  names = [f"{p}mlp.experts.{i}.down_proj.weight" for i in range(e)]

  def per_expert(out, get):
    for i in range(e):
      out[i] = get(names[i]).T

  v5 = p + "mlp.experts.down_proj"
  return [Alternative({n: (h, f) for n in names}, per_expert),
          Alternative({v5: (e, h, f)}, lambda out, get: out.__setitem__(Ellipsis, get(v5).transpose(0, 2, 1)))]


def _layer_alternatives(cfg: ModelConfig, p: str, rel: tuple[str, ...], shape) -> list[Alternative]:
  n, kv, d, h, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.num_experts
  a = "self_attn."
  key = "/".join(rel)
  if key == "attn/q":
    return _linear(p + a + "q_proj.weight", (n * d, h), shape) + [_qkv(p, cfg, "q")]
  if key in ("attn/k", "attn/v"):
    return _linear(p + a + f"{rel[1]}_proj.weight", (kv * d, h), shape) + [_qkv(p, cfg, rel[1])]
  if key == "attn/o":
    return _linear(p + a + "o_proj.weight", (h, n * d), shape)
  if key == "attn/q_norm":
    return _as_is([p + a + "query_layernorm.weight", p + a + "q_norm.weight"], shape)
  if key == "attn/k_norm":
    return _as_is([p + a + "key_layernorm.weight", p + a + "k_norm.weight"], shape)
  if key == "input_norm/scale":
    return _as_is([p + "input_layernorm.weight"], shape)
  if key == "post_attn_norm/scale":
    return _as_is([p + "post_attention_layernorm.weight"], shape)
  if key == "mlp/wi":
    return _swiglu_in([p + "mlp."], h, shape[-1])
  if key == "mlp/wo":
    return _linear(p + "mlp.down_proj.weight", (h, shape[0]), shape)
  if key == "moe/router":
    return sum((_linear(p + name, (e, h), shape)
                for name in ("mlp.gate.wg.weight", "mlp.router.gate.weight", "mlp.gate.weight")), [])
  if key == "moe/expert_bias":
    return _as_is([p + "mlp.expert_bias", p + "mlp.e_score_correction_bias"], shape)
  if key == "moe/shared/wi":
    return _swiglu_in([p + "mlp.shared_mlp.", p + "mlp.shared_experts."], h, shape[-1])
  if key == "moe/shared/wo":
    return sum((_linear(p + base + "down_proj.weight", (h, shape[0]), shape)
                for base in ("mlp.shared_mlp.", "mlp.shared_experts.")), [])
  if key == "moe/wi":
    return _experts_in(p, e, h, shape[-1])
  if key == "moe/wo":
    return _experts_out(p, e, h, shape[1])
  raise KeyError(f"no HF name rule for layer param {key!r}; add one to hunyuan_jax/checkpoint/hf_names.py")


def import_alternatives(cfg: ModelConfig, sl: Slice) -> list[Alternative]:
  h = cfg.hidden_size
  if sl.scope == "layer":
    return _layer_alternatives(cfg, f"model.layers.{sl.layer}.", sl.rel, sl.shape)
  key = "/".join(sl.rel)
  if sl.scope == "mtp":
    p = f"model.layers.{sl.layer}."
    table = {"enorm/scale": "enorm.weight", "hnorm/scale": "hnorm.weight",
             "final_norm/scale": "final_layernorm.weight"}
    if key in table:
      return _as_is([p + table[key]], sl.shape)
    if key == "eh_proj":
      return _linear(p + "eh_proj.weight", (h, 2 * h), sl.shape)
  if sl.scope == "top":
    if key == "embed":
      return _as_is(["model.embed_tokens.weight"], sl.shape)
    if key == "final_norm/scale":
      return _as_is(["model.norm.weight"], sl.shape)
    if key == "lm_head":
      return _as_is(["lm_head.weight"], sl.shape)
  raise KeyError(f"no HF name rule for param {path_str(sl.path)!r}")


def ignored_name_rules(cfg: ModelConfig) -> list[tuple[re.Pattern, str]]:
  """Checkpoint names that are skipped on purpose, each with the reason (nothing else is skipped)."""
  rules = [(re.compile(r".*\.rotary_emb\.inv_freq$"), "RoPE buffer; recomputed from the config")]
  if cfg.tie_word_embeddings:
    rules.append((re.compile(r"^lm_head\.weight$"), "tied to model.embed_tokens.weight (spec trap 6)"))
  for m in range(cfg.num_mtp_layers):
    rules.append((re.compile(rf"^model\.layers\.{cfg.num_layers + m}\.(shared_head|embed_tokens)\."),
                  "MTP shared_head/embed_tokens: the main embedding and lm_head are used (spec 2.9)"))
  return rules


# ---------------------------------------------------------------------------------------------
# Export: names + shapes + how to cut each tensor out of a slice
# ---------------------------------------------------------------------------------------------
Export = list[tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]]


def _tr(shape_torch) -> Callable[[np.ndarray], np.ndarray]:
  return lambda x: x.reshape(shape_torch[::-1]).T


def _swiglu_out(base: str, h: int, f: int) -> Export:
  return [(base + "gate_proj.weight", (f, h), lambda x: x[:, 0, :].T),
          (base + "up_proj.weight", (f, h), lambda x: x[:, 1, :].T)]


def export_tensors(cfg: ModelConfig, sl: Slice, layout: str) -> Export:
  """(HF name, shape, slice -> tensor) for one slice in `layout` ("hub" or "fused")."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown HF layout {layout!r}; use one of {LAYOUTS}")
  n, kv, d, h, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.num_experts
  hy3 = cfg.family == "hy3"
  key = "/".join(sl.rel)
  if sl.scope == "top":
    name = {"embed": "model.embed_tokens.weight", "final_norm/scale": "model.norm.weight",
            "lm_head": "lm_head.weight"}[key]
    return [(name, sl.shape, lambda x: x)]
  p = f"model.layers.{sl.layer}."
  if sl.scope == "mtp":
    if key == "eh_proj":
      return [(p + "eh_proj.weight", (h, 2 * h), lambda x: x.T)]
    name = {"enorm/scale": "enorm", "hnorm/scale": "hnorm", "final_norm/scale": "final_layernorm"}[key]
    return [(p + name + ".weight", sl.shape, lambda x: x)]
  a = p + "self_attn."
  shared = p + ("mlp.shared_experts." if hy3 and layout == "fused" else "mlp.shared_mlp.")
  if key in ("attn/q", "attn/k", "attn/v", "attn/o"):
    out = (h, n * d) if key == "attn/o" else ((n if key == "attn/q" else kv) * d, h)
    return [(a + f"{sl.rel[1]}_proj.weight", out, _tr(out))]
  if key in ("attn/q_norm", "attn/k_norm"):
    name = sl.rel[1] if hy3 else {"q_norm": "query_layernorm", "k_norm": "key_layernorm"}[sl.rel[1]]
    return [(a + name + ".weight", sl.shape, lambda x: x)]
  if key in ("input_norm/scale", "post_attn_norm/scale"):
    name = "input_layernorm" if key.startswith("input") else "post_attention_layernorm"
    return [(p + name + ".weight", sl.shape, lambda x: x)]
  if key == "mlp/wi":
    return _swiglu_out(p + "mlp.", h, sl.shape[-1])
  if key == "mlp/wo":
    return [(p + "mlp.down_proj.weight", (h, sl.shape[0]), lambda x: x.T)]
  if key == "moe/router":
    name = ("mlp.gate.weight" if layout == "fused" else "mlp.router.gate.weight") if hy3 else "mlp.gate.wg.weight"
    return [(p + name, (e, h), lambda x: x.T)]
  if key == "moe/expert_bias":
    return [(p + ("mlp.e_score_correction_bias" if layout == "fused" else "mlp.expert_bias"), (e,), lambda x: x)]
  if key == "moe/shared/wi":
    return _swiglu_out(shared, h, sl.shape[-1])
  if key == "moe/shared/wo":
    return [(shared + "down_proj.weight", (h, sl.shape[0]), lambda x: x.T)]
  f = sl.shape[-1] if key == "moe/wi" else sl.shape[1]
  if key == "moe/wi" and layout == "fused":
    return [(p + "mlp.experts.gate_up_proj", (e, 2 * f, h),
             lambda x: x.transpose(0, 2, 3, 1).reshape(e, 2 * f, h))]
  if key == "moe/wo" and layout == "fused":
    return [(p + "mlp.experts.down_proj", (e, h, f), lambda x: x.transpose(0, 2, 1))]
  if key == "moe/wi":
    return sum(([(p + f"mlp.experts.{i}.gate_proj.weight", (f, h), lambda x, i=i: x[i, :, 0, :].T),
                 (p + f"mlp.experts.{i}.up_proj.weight", (f, h), lambda x, i=i: x[i, :, 1, :].T)]
                for i in range(e)), [])
  if key == "moe/wo":
    return [(p + f"mlp.experts.{i}.down_proj.weight", (h, f), lambda x, i=i: x[i].T) for i in range(e)]
  raise KeyError(f"no HF export rule for param {path_str(sl.path)!r}")

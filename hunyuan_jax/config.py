"""ModelConfig: one frozen dataclass for the Hunyuan family, parsed from any HF config.json.

Families (HUNYUAN_SPEC.md section 1):
  a13b   Hunyuan-A13B (`hunyuan` remote code, `hunyuan_v1_moe`): softmax top-k, renormalised.
  large  Hunyuan-Large: cross-layer attention (CLA), softmax top-1 weighted by the raw probability.
  hy3    Hy3 (`hy_v3`): sigmoid router + selection-only bias, x2.826, QK-norm before RoPE, MTP.
  dense  HunYuan v1 dense (`hunyuan_v1_dense`): A13B attention, SwiGLU FFN everywhere.
The variants differ only by the fields below; the model code has no per-family branches.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from typing import Any, NamedTuple, Sequence

FAMILIES = ("a13b", "large", "hy3", "dense")

# Rematerialisation policies of the layer scan (model/transformer.py defines them).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_except_experts")


class LayerSpec(NamedTuple):
  """Static description of one decoder layer; layers with equal specs share a scan."""
  kv_source: str        # "self": own K/V projections; "shared": reuse the previous self layer's K/V (CLA)
  ffn: str              # "dense" or "moe"
  ffn_size: int         # dense FFN width, or one routed expert's width
  top_k: int = 0
  shared_size: int = 0  # width of the always-on shared expert (0: none)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str = "a13b"
  vocab_size: int = 128167
  hidden_size: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 8
  head_dim: int = 128
  intermediate_size: int = 3072          # dense FFN width (dense layers, and A13B's expert default)
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_alpha: float = 0.0                # dynamic-NTK alpha; 0 = plain RoPE. Base held constant at all lengths.
  max_position_embeddings: int = 32768
  qk_norm: str = "after_rope"            # "after_rope" (A13B/Large), "before_rope" (Hy3), "none"
  cla_share_factor: int = 1              # 1 = no cross-layer attention; Large: 2
  tie_word_embeddings: bool = True
  # Per-layer FFN layout; tuples have one entry per layer.
  mlp_layer_types: tuple[str, ...] = ("moe",) * 32
  num_experts: int = 64
  moe_top_k: tuple[int, ...] = (8,) * 32
  moe_intermediate_size: tuple[int, ...] = (3072,) * 32
  shared_expert_size: tuple[int, ...] = (3072,) * 32   # 0 = no shared expert
  router_scoring: str = "softmax"        # "softmax" or "sigmoid"
  router_renormalize: bool = True
  router_scale: float = 1.0
  router_eps: float = 0.0
  router_bias: bool = False              # Hy3 selection-only expert_bias
  moe_fp32_combine: bool = False         # Hy3 adds routed + shared in fp32
  moe_capacity_factor: float = 0.0       # 0 = dropless; >0 = Tencent remote-code token dropping (spec 2.7)
  moe_expert_recycling: bool = False     # with a capacity: re-route over-capacity assignments (Hunyuan-Large)
  num_mtp_layers: int = 0                # Hy3 multi-token-prediction layers
  # Tokens.
  pad_token_id: int = 0
  bos_token_id: int = 1
  eos_token_ids: tuple[int, ...] = (2,)
  # Numerics and implementation choices (not part of the checkpoint).
  dtype: str = "bfloat16"                # compute dtype of activations
  param_dtype: str = "bfloat16"          # dtype of freshly initialised parameters
  attention_impl: str = "xla"            # "xla" (einsum, any platform) or "cudnn" (GPU flash attention)
  moe_impl: str = "auto"                 # "auto" (kernels_pallas dispatch) or a forced kernels backend
  remat_policy: str = "none"             # one of REMAT_POLICIES (see model/transformer.py)

  def __post_init__(self):
    _validate(self)

  # ---- derived structure -------------------------------------------------------------
  def layer_spec(self, i: int) -> LayerSpec:
    kv_source = "self" if self.cla_share_factor <= 1 or i % self.cla_share_factor == 0 else "shared"
    if self.mlp_layer_types[i] == "dense":
      return LayerSpec(kv_source, "dense", self.intermediate_size)
    return LayerSpec(kv_source, "moe", self.moe_intermediate_size[i], self.moe_top_k[i],
                     self.shared_expert_size[i])

  def layer_groups(self) -> list[tuple[tuple[LayerSpec, ...], int]]:
    """Split the layers into runs of a repeated pattern: [(pattern, repeats), ...].

    A13B: [((moe,), 32)]; Large: [((self, shared), 32)]; Hy3: [((dense,), 1), ((moe,), 79)].
    Each run becomes one `nn.scan`, so an 80-layer model compiles like a few layers.
    """
    period = max(self.cla_share_factor, 1)
    specs = [self.layer_spec(i) for i in range(self.num_layers)]
    units = [tuple(specs[i:i + period]) for i in range(0, self.num_layers, period)]
    groups: list[tuple[tuple[LayerSpec, ...], int]] = []
    for unit in units:
      if groups and groups[-1][0] == unit:
        groups[-1] = (unit, groups[-1][1] + 1)
      else:
        groups.append((unit, 1))
    return groups

  @property
  def num_kv_layers(self) -> int:
    """Layers that own a KV cache entry (half of them for CLA with factor 2)."""
    return sum(self.layer_spec(i).kv_source == "self" for i in range(self.num_layers))

  def replace(self, **overrides) -> "ModelConfig":
    unknown = [k for k in overrides if k not in _FIELD_NAMES]
    if unknown:
      raise ValueError(_unknown_field_message(unknown[0]))
    return dataclasses.replace(self, **_coerce(overrides))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  # ---- HF config.json ----------------------------------------------------------------
  @classmethod
  def from_hf_config(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
    return cls(**_coerce({**parse_hf_config(hf), **overrides}))

  @classmethod
  def from_pretrained(cls, path: str, **overrides) -> "ModelConfig":
    """Reads `config.json` in a model folder (or the file itself, or a preset name)."""
    return cls.from_hf_config(read_config_json(path), **overrides)

  def to_hf_config(self) -> dict[str, Any]:
    from hunyuan_jax.checkpoint import hf_config  # local import: keeps this module light
    return hf_config.to_hf_config(self)


_FIELD_NAMES = {f.name for f in dataclasses.fields(ModelConfig)}
_PER_LAYER = ("mlp_layer_types", "moe_top_k", "moe_intermediate_size", "shared_expert_size")


def _unknown_field_message(name: str) -> str:
  close = difflib.get_close_matches(name, sorted(_FIELD_NAMES), n=3)
  hint = f" Did you mean {', '.join(close)}?" if close else ""
  return f"ModelConfig has no field {name!r}.{hint}"


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
  out = dict(values)
  for key in ("eos_token_ids",) + _PER_LAYER:
    if key in out and isinstance(out[key], list):
      out[key] = tuple(out[key])
  return out


def _validate(c: ModelConfig) -> None:
  def bad(field: str, why: str):
    raise ValueError(f"ModelConfig.{field}: {why}")

  if c.family not in FAMILIES:
    bad("family", f"{c.family!r} is not one of {FAMILIES}")
  for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
    if getattr(c, name) <= 0:
      bad(name, f"must be positive, got {getattr(c, name)}")
  if c.num_heads % c.num_kv_heads:
    bad("num_kv_heads", f"{c.num_kv_heads} must divide num_heads={c.num_heads} (GQA groups)")
  if c.head_dim % 2:
    bad("head_dim", f"RoPE needs an even head_dim, got {c.head_dim}")
  if c.qk_norm not in ("after_rope", "before_rope", "none"):
    bad("qk_norm", f"{c.qk_norm!r} is not one of after_rope, before_rope, none")
  if c.cla_share_factor < 1:
    bad("cla_share_factor", "must be >= 1 (1 disables cross-layer attention)")
  if c.cla_share_factor > 1 and c.qk_norm == "before_rope":
    bad("cla_share_factor", "cross-layer attention shares pre-norm keys; it needs qk_norm after_rope or none")
  for name in _PER_LAYER:
    value = getattr(c, name)
    if not isinstance(value, tuple) or len(value) != c.num_layers:
      bad(name, f"needs one entry per layer ({c.num_layers}), got {value!r}")
  for i, kind in enumerate(c.mlp_layer_types):
    if kind not in ("dense", "moe"):
      bad("mlp_layer_types", f"layer {i}: {kind!r} is not 'dense' or 'moe'")
    if kind == "moe":
      if not 1 <= c.moe_top_k[i] <= c.num_experts:
        bad("moe_top_k", f"layer {i}: top-k {c.moe_top_k[i]} outside [1, num_experts={c.num_experts}]")
      if c.moe_intermediate_size[i] <= 0:
        bad("moe_intermediate_size", f"layer {i}: must be positive")
  if c.router_scoring not in ("softmax", "sigmoid"):
    bad("router_scoring", f"{c.router_scoring!r} is not 'softmax' or 'sigmoid'")
  if c.dtype not in ("bfloat16", "float32", "float16"):
    bad("dtype", f"{c.dtype!r} is not bfloat16, float16 or float32")
  if c.param_dtype not in ("bfloat16", "float32", "float16"):
    bad("param_dtype", f"{c.param_dtype!r} is not bfloat16, float16 or float32")
  if c.attention_impl not in ("xla", "cudnn"):
    bad("attention_impl", f"{c.attention_impl!r} is not 'xla' or 'cudnn'")
  if c.remat_policy not in REMAT_POLICIES:
    bad("remat_policy", f"{c.remat_policy!r} is not one of {', '.join(REMAT_POLICIES)}")
  if c.moe_capacity_factor < 0:
    bad("moe_capacity_factor", "must be >= 0 (0 = dropless)")
  if c.moe_expert_recycling and c.moe_capacity_factor <= 0:
    bad("moe_expert_recycling", "re-routes assignments over an expert's capacity; set moe_capacity_factor > 0")
  if c.num_mtp_layers and c.family != "hy3":
    bad("num_mtp_layers", "MTP layers exist only for the hy3 family")


# ---------------------------------------------------------------------------------------
# HF config.json parsing
# ---------------------------------------------------------------------------------------
_PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def preset_names() -> list[str]:
  if not os.path.isdir(_PRESET_DIR):
    return []
  return sorted(f[:-5] for f in os.listdir(_PRESET_DIR) if f.endswith(".json"))


def read_config_json(path: str) -> dict[str, Any]:
  """`path` may be a model folder, a config.json file, or a preset name from configs/."""
  candidates = [path, os.path.join(path, "config.json"), os.path.join(_PRESET_DIR, f"{path}.json")]
  for candidate in candidates:
    if os.path.isfile(candidate):
      with open(candidate) as f:
        return json.load(f)
  raise FileNotFoundError(
      f"No config.json at {path!r}. Pass a model folder, a config.json file, "
      f"or one of the presets {preset_names()}.")


def _per_layer(hf: dict, key: str, num_layers: int, default: Any) -> tuple:
  value = hf.get(key, default)
  if isinstance(value, (list, tuple)):
    if len(value) != num_layers:
      raise ValueError(f"config.json field {key!r} has {len(value)} entries, expected one per layer "
                       f"(num_hidden_layers={num_layers})")
    return tuple(value)
  return (value,) * num_layers


def _rope(hf: dict, head_dim: int) -> tuple[float, float]:
  """(rope_theta, alpha) from `rope_theta` + `rope_scaling` (remote code) or `rope_parameters` (v5)."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  rope_type = params.get("rope_type", params.get("type", scaling.get("type", scaling.get("rope_type"))))
  alpha = params.get("alpha", scaling.get("alpha"))
  if rope_type in (None, "default"):
    return theta, 0.0
  if rope_type in ("dynamic", "ntk_alpha") and alpha:
    return theta, float(alpha)
  raise ValueError(
      f"config.json rope scaling {rope_type!r} (alpha={alpha}) is not supported: Hunyuan checkpoints use "
      "dynamic NTK with a fixed `alpha` or plain RoPE. Remove the field or set rope_type to 'default'.")


def _family(hf: dict) -> str:
  model_type = hf.get("model_type", "")
  archs = " ".join(hf.get("architectures") or [])
  if model_type == "hy_v3" or "HYV3" in archs:
    return "hy3"
  if model_type == "hunyuan_v1_dense" or "Dense" in archs:
    return "dense"
  if model_type in ("hunyuan", "hunyuan_v1_moe") or "HunYuan" in archs:
    num_experts = hf.get("num_experts", 1)
    if isinstance(num_experts, list):
      num_experts = num_experts[0]
    if not num_experts or num_experts <= 1:
      return "dense"
    return "large" if hf.get("use_cla") else "a13b"
  raise ValueError(f"config.json model_type {model_type!r} / architectures {archs!r} is not a Hunyuan "
                   "model this project knows (hunyuan, hunyuan_v1_moe, hunyuan_v1_dense, hy_v3)")


def _unsupported(hf: dict) -> None:
  checks = {
      "hidden_act": lambda v: v not in (None, "silu"),
      "attention_bias": bool, "mlp_bias": bool, "bias": bool,
      "moe_random_routing_dropped_token": bool,
  }
  for key, is_bad in checks.items():
    if key in hf and is_bad(hf[key]):
      raise ValueError(f"config.json field {key!r}={hf[key]!r} is not supported by hunyuan-jax")


def parse_hf_config(hf: dict[str, Any]) -> dict[str, Any]:
  """Maps any Hunyuan HF config.json to ModelConfig fields."""
  _unsupported(hf)
  family = _family(hf)
  num_layers = int(hf["num_hidden_layers"])
  hidden = int(hf["hidden_size"])
  heads = int(hf["num_attention_heads"])
  # The remote code (`hunyuan`) derives head_dim from hidden/heads and ignores
  # `attention_head_dim` (spec trap 8); v5 configs and Hy3 carry `head_dim`.
  if hf.get("model_type") == "hunyuan":
    head_dim = hidden // heads
  else:
    head_dim = int(hf.get("head_dim") or hidden // heads)
  theta, alpha = _rope(hf, head_dim)
  eos = hf.get("eos_token_id", 2)
  eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
  out: dict[str, Any] = dict(
      family=family, vocab_size=int(hf["vocab_size"]), hidden_size=hidden, num_layers=num_layers,
      num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
      intermediate_size=int(hf["intermediate_size"]), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
      rope_theta=theta, rope_alpha=alpha,
      max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", family != "hy3")),
      pad_token_id=int(hf.get("pad_token_id") or 0), bos_token_id=int(hf.get("bos_token_id") or 0),
      eos_token_ids=eos_ids)
  if family == "hy3":
    first_dense = int(hf.get("first_k_dense_replace", 1))
    types = hf.get("mlp_layer_types") or (["dense"] * first_dense + ["sparse"] * (num_layers - first_dense))
    moe_size = int(hf.get("moe_intermediate_size", hf.get("expert_hidden_dim", 1536)))
    shared = int(hf.get("num_shared_experts", 1)) * moe_size
    out.update(
        qk_norm="before_rope" if hf.get("qk_norm", True) else "none",
        mlp_layer_types=tuple("moe" if t in ("sparse", "moe") else "dense" for t in types),
        num_experts=int(hf.get("num_experts", 192)),
        moe_top_k=(int(hf.get("num_experts_per_tok", 8)),) * num_layers,
        moe_intermediate_size=(moe_size,) * num_layers, shared_expert_size=(shared,) * num_layers,
        router_scoring="sigmoid", router_renormalize=bool(hf.get("route_norm", True)),
        router_scale=float(hf.get("router_scaling_factor", 2.826)), router_eps=1e-20,
        router_bias=True, moe_fp32_combine=bool(hf.get("enable_moe_fp32_combine", True)),
        num_mtp_layers=int(hf.get("num_nextn_predict_layers", 0)))
    return out
  out["qk_norm"] = "after_rope" if hf.get("use_qk_norm", True) else "none"
  out["cla_share_factor"] = int(hf.get("cla_share_factor", 2)) if hf.get("use_cla") else 1
  if family == "dense":
    out.update(mlp_layer_types=("dense",) * num_layers, num_experts=1, moe_top_k=(1,) * num_layers,
               moe_intermediate_size=(out["intermediate_size"],) * num_layers,
               shared_expert_size=(0,) * num_layers)
    return out
  skipped = int(hf.get("moe_layer_num_skipped", 0))
  top_k = _per_layer(hf, "moe_topk", num_layers, 1)
  # The remote code builds experts and the shared MLP with intermediate_size (spec trap 9).
  expert_size = _per_layer(hf, "moe_intermediate_size", num_layers, out["intermediate_size"])
  use_shared = hf.get("use_mixed_mlp_moe", True)
  num_shared = _per_layer(hf, "num_shared_expert", num_layers, 1)
  out.update(
      mlp_layer_types=tuple("dense" if i < skipped else "moe" for i in range(num_layers)),
      num_experts=int(hf.get("num_experts")),
      moe_top_k=tuple(int(k) for k in top_k),
      moe_intermediate_size=tuple(int(s) for s in expert_size),
      shared_expert_size=tuple(int(n) * out["intermediate_size"] if use_shared else 0
                               for n in num_shared),
      router_scoring="softmax",
      # Large's top-1 weight is the raw probability; A13B renormalises its top-8 (spec 2.7).
      router_renormalize=bool(hf.get("norm_topk_prob", True)) and max(top_k) > 1)
  return out


def load_preset(name: str, **overrides) -> ModelConfig:
  return ModelConfig.from_pretrained(name, **overrides)


def dims_summary(c: ModelConfig) -> str:
  groups = ", ".join(f"{len(p)}x{r}" for p, r in c.layer_groups())
  return (f"{c.family}: {c.num_layers} layers ({groups}), hidden {c.hidden_size}, heads {c.num_heads}/"
          f"{c.num_kv_heads}x{c.head_dim}, experts {c.num_experts}, vocab {c.vocab_size}")


def override_from_strings(c: ModelConfig, items: Sequence[str]) -> ModelConfig:
  """Applies `field=value` strings (values parsed as JSON when possible)."""
  overrides = {}
  for item in items:
    key, sep, raw = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} must look like field=value")
    try:
      overrides[key] = json.loads(raw)
    except json.JSONDecodeError:
      overrides[key] = raw
  n = overrides.get("num_layers")
  if isinstance(n, int) and n <= c.num_layers:   # the first n layers: per-layer fields follow
    overrides = {**{k: getattr(c, k)[:n] for k in _PER_LAYER}, **overrides}
  return c.replace(**overrides)


def with_num_layers(c: ModelConfig, n: int) -> ModelConfig:
  """The model's first `n` layers (benchmarks that time as many layers as fit a device)."""
  return override_from_strings(c, [f"num_layers={n}"])

"""An independent float64 numpy implementation of HUNYUAN_SPEC.md section 2.

Written from the spec text, not from hunyuan_jax.model: it reads weights by their Hugging Face
names (PyTorch [out, in] layout) so it shares no code or layout with the port it checks. It covers
what transformers has no class for: Hunyuan-Large's cross-layer attention (2.6) and the Tencent
remote code's capacity-limited top-k gating (2.7).
"""
from __future__ import annotations

import numpy as np


def rms_norm(x, w, eps):
  return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rope_tables(positions, head_dim, theta, alpha):
  base = theta * alpha ** (head_dim / (head_dim - 2)) if alpha else theta
  base = float(np.float32(base))  # torch evaluates base ** f32 tensor in fp32
  inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)
  ang = positions[:, None] * inv_freq[None]
  emb = np.concatenate([ang, ang], -1)
  return np.cos(emb), np.sin(emb)


def rope(x_thd, cos, sin):
  half = x_thd.shape[-1] // 2
  rot = np.concatenate([-x_thd[..., half:], x_thd[..., :half]], -1)
  return x_thd * cos[:, None] + rot * sin[:, None]


def swiglu(x, gate_w, up_w, down_w, fp8=False):
  mm = fp8_matmul if fp8 else (lambda x, w: x @ w.T)
  g = mm(x, gate_w)
  return mm((g / (1 + np.exp(-g))) * mm(x, up_w), down_w)


def fp8_round(v):
  """To the nearest e4m3fn value (saturating at +-448), from float32 as the port rounds."""
  import ml_dtypes
  return np.clip(v, -448, 448).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


def fp8_matmul(x, w):
  """W8A8 e4m3: x [K] or [T, K] scaled per row, w [N, K] (PyTorch layout) per output channel,
  each to absmax / 448; the products of the rounded values, rescaled."""
  x2 = np.atleast_2d(x)
  sx = np.maximum(np.abs(x2).max(-1, keepdims=True), 1e-12) / 448
  sw = np.maximum(np.abs(w).max(-1), 1e-12) / 448
  y = (fp8_round(x2 / sx) @ fp8_round(w / sw[:, None]).T) * sx * sw
  return y.reshape(np.shape(x)[:-1] + (w.shape[0],))


def topk_gating_capacity(probs_te, k, capacity_factor=1.0):
  """Tencent `topkgating`: j-major, token-minor slots; keep slot < cap; weights p / sum(top-k p)."""
  t, e = probs_te.shape
  cap = max(k, int(capacity_factor * k * t / e))
  idx_tk = np.argsort(-probs_te, axis=-1, kind="stable")[:, :k]
  p_tk = np.take_along_axis(probs_te, idx_tk, -1)
  w_tk = p_tk / np.maximum(p_tk.sum(-1, keepdims=True), np.finfo(np.float32).eps)
  counts = np.zeros(e, int)
  keep = np.zeros((t, k), bool)
  for j in range(k):
    for tok in range(t):
      ex = idx_tk[tok, j]
      keep[tok, j] = counts[ex] < cap
      counts[ex] += 1
  return idx_tk, np.where(keep, w_tk, 0.0)


def moe(x_td, w, prefix, hf_cfg, capacity_factor=0.0, fp8_experts=False):
  k = hf_cfg["moe_topk"]
  logits = x_td @ w[prefix + "mlp.gate.wg.weight"].T
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  if capacity_factor:
    idx, weights = topk_gating_capacity(probs, k, capacity_factor)
  else:
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, idx, -1)
    if k > 1:  # A13B renormalises its top-k; Large's top-1 keeps the raw probability
      weights = weights / weights.sum(-1, keepdims=True)
  out = np.zeros_like(x_td)
  for tok in range(x_td.shape[0]):
    for j in range(k):
      e = idx[tok, j]
      ep = f"{prefix}mlp.experts.{e}."
      out[tok] += weights[tok, j] * swiglu(x_td[tok], w[ep + "gate_proj.weight"], w[ep + "up_proj.weight"],
                                           w[ep + "down_proj.weight"], fp8_experts)
  sp = prefix + "mlp.shared_mlp."
  return out + swiglu(x_td, w[sp + "gate_proj.weight"], w[sp + "up_proj.weight"], w[sp + "down_proj.weight"])


def attention(x_td, w, prefix, hf_cfg, cos, sin, kv_raw=None):
  """Returns (out, (K_raw, V_raw)); a CLA cross layer passes the previous self layer's kv_raw."""
  t = x_td.shape[0]
  n, kvh = hf_cfg["num_attention_heads"], hf_cfg["num_key_value_heads"]
  d = hf_cfg["hidden_size"] // n
  eps = hf_cfg["rms_norm_eps"]
  q = (x_td @ w[prefix + "self_attn.q_proj.weight"].T).reshape(t, n, d)
  if kv_raw is None:
    kv_raw = ((x_td @ w[prefix + "self_attn.k_proj.weight"].T).reshape(t, kvh, d),
              (x_td @ w[prefix + "self_attn.v_proj.weight"].T).reshape(t, kvh, d))
  k_raw, v = kv_raw
  # A13B/Large order: RoPE first, then the per-head RMSNorm (each layer's own key norm).
  q = rms_norm(rope(q, cos, sin), w[prefix + "self_attn.query_layernorm.weight"], eps)
  k = rms_norm(rope(k_raw, cos, sin), w[prefix + "self_attn.key_layernorm.weight"], eps)
  g = n // kvh
  out = np.zeros((t, n, d))
  causal = np.tril(np.ones((t, t), bool))
  for h in range(n):
    s = q[:, h] @ k[:, h // g].T / np.sqrt(d)
    s = np.where(causal, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out[:, h] = p @ v[:, h // g]
  return out.reshape(t, n * d) @ w[prefix + "self_attn.o_proj.weight"].T, kv_raw


def forward(tokens, w, hf_cfg, capacity_factor=0.0, fp8_experts=False):
  """Logits [T, V] for one sequence of a `hunyuan` (A13B / Large) remote-code config.
  fp8_experts: the routed experts' matmuls in W8A8 e4m3 (fp8_matmul); the shared expert is not."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  eps = hf_cfg["rms_norm_eps"]
  n = hf_cfg["num_attention_heads"]
  head_dim = hf_cfg["hidden_size"] // n
  alpha = (hf_cfg.get("rope_scaling") or {}).get("alpha", 0.0)
  cos, sin = rope_tables(np.arange(len(tokens), dtype=np.float64), head_dim, hf_cfg["rope_theta"], alpha)
  h = w["model.embed_tokens.weight"][tokens]
  share = hf_cfg["cla_share_factor"] if hf_cfg.get("use_cla") else 1
  kv_raw = None
  for i in range(hf_cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    is_self = i % share == 0
    a, kv = attention(rms_norm(h, w[p + "input_layernorm.weight"], eps), w, p, hf_cfg, cos, sin,
                      None if is_self else kv_raw)
    if is_self:
      kv_raw = kv
    h = h + a
    h = h + moe(rms_norm(h, w[p + "post_attention_layernorm.weight"], eps), w, p, hf_cfg, capacity_factor,
                fp8_experts)
  h = rms_norm(h, w["model.norm.weight"], eps)
  return h @ w["model.embed_tokens.weight"].T

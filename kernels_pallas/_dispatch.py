"""Backend selection shared by the public ops.

Order: the op's `backend=` keyword, then the env var KERNELS_PALLAS_BACKEND (one name for
every op, or per op: "gmm=gpu,route=reference"), then "auto" (platform, dtype, shape).
"""
import os

import jax

ENV_VAR = "KERNELS_PALLAS_BACKEND"


def requested_backend(op: str, backend):
  if backend:
    return backend
  value = os.environ.get(ENV_VAR, "").strip()
  if not value:
    return "auto"
  if "=" not in value:
    return value
  for item in value.split(","):
    name, _, choice = item.partition("=")
    if name.strip() == op:
      return choice.strip()
  return "auto"


def platform() -> str:
  return jax.default_backend()


def is_hopper() -> bool:
  if platform() != "gpu":
    return False
  cc = getattr(jax.devices()[0], "compute_capability", "") or ""
  return str(cc).startswith("9")


def check_known(op: str, name: str, known):
  if name not in known:
    raise ValueError(f"kernels_pallas.{op}: unknown backend {name!r}; pass backend= one of "
                     f"{sorted(known)} or 'auto' (or fix ${ENV_VAR}).")

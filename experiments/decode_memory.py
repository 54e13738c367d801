"""Compiled temporary memory of one decode step vs the KV cache size (CPU proxy, no GPU needed).

    PYTHONPATH=. python experiments/decode_memory.py

A decode step that copies the cache inside the layer scan needs temp memory ~ the cache size;
one that keeps the cache read-only in the scan and scatters the new rows in place (donated) needs
only the per-layer activations.
"""
import jax
import jax.numpy as jnp

from hunyuan_jax.config import load_preset
from hunyuan_jax.model import abstract_params, forward, init_cache


def main(batch=8, max_len=4096):
  cfg = load_preset("tiny", dtype="float32", param_dtype="float32")
  cache = jax.eval_shape(lambda: init_cache(cfg, batch, max_len))
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))

  def step(params, cache, tokens, positions):
    out = forward(params, tokens, positions, cache, cfg=cfg)
    return out.logits, out.cache

  tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
  compiled = jax.jit(step, donate_argnums=1).lower(abstract_params(cfg), cache, tokens, tokens).compile()
  mem = compiled.memory_analysis()
  print(f"jax {jax.__version__} {jax.default_backend()}: cache {cache_bytes / 2**20:.1f} MiB, "
        f"decode-step temp {mem.temp_size_in_bytes / 2**20:.1f} MiB, "
        f"output aliased to donated input {mem.alias_size_in_bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
  main()

"""The functional core: Flax modules that declare parameters, and the pure `forward`."""
from hunyuan_jax.model.attention import KV, write_kv_rows
from hunyuan_jax.model.transformer import (ForwardOut, Transformer, abstract_params, cache_logical_axes,
                                           forward, forward_mtp, head_weight, init_cache, init_params, param_logical_axes)

__all__ = ["KV", "write_kv_rows", "ForwardOut", "Transformer", "abstract_params", "cache_logical_axes", "forward", "forward_mtp", "head_weight",
           "init_cache", "init_params", "param_logical_axes"]

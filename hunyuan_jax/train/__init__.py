"""Training: absl entry point (`python -m hunyuan_jax.train`), step, optimizer, data, checkpoints."""

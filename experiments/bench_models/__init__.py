"""Model plug-ins of the benchmarks (not part of codistill_jax)."""

"""codistill_jax: codistillation (online distillation) at scale in JAX/Flax.

See README.md for a tour and DESIGN notes; the pure pieces live in `step`,
`losses` and (later) `sampling`; the host loop in `train`.
"""

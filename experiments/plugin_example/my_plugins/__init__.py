"""A model and a dataset that live outside codistill_jax (README example)."""

"""A model and a dataset that live outside codistill_jax (the example of docs/extending.md)."""

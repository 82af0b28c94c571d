"""Test setup: 8 fake CPU devices, strict rank promotion.

The environment must be set before jax is imported anywhere, hence at the top of
conftest, which pytest imports before any test module.
"""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402  (must follow the environment set-up above)

jax.config.update("jax_numpy_rank_promotion", "raise")

"""Test setup: 8 fake CPU devices, strict rank promotion.

The environment must be set before jax is imported anywhere, hence at the top of
conftest, which pytest imports before any test module.
"""

import atexit
import os
import shutil
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
# The tests' programs are tiny: XLA's backend optimisations cost more compile
# time than they save in run time (the quick subset runs ~15% faster at -O0).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") +
    " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0").strip()

# One persistent compilation cache for the session, this process and the
# CLI runs it starts (they read the same variable): the many tests that build
# the same tiny programs compile each once. Fresh per session, so a test never
# sees another session's programs.
_CACHE = tempfile.mkdtemp(prefix="codistill_jax_test_compile_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# Tests describe TPU slices in this process and compile for them in others:
# neither opens a chip, so neither needs libtpu's one-process lock.
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"

import jax  # noqa: E402  (must follow the environment set-up above)

jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
  """Config overrides pointing each quick config at small files in tmp."""
  from tests import datagen  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("data")
  fmnist = datagen.write_fashion_mnist(str(root / "fashion-mnist"))
  docs = datagen.write_rst_docs(str(root / "docs"))
  return {
      "fashion_mnist": [f"--config.data.path={fmnist}",
                        "--config.data.validation_size=100"],
      "kernel_lm": [f"--config.data.path={docs}",
                    f"--config.data.cache_dir={root / 'cache'}"],
      "english_lm": [f"--config.data.roots.kernel_docs={docs}",
                     f"--config.data.cache_dir={root / 'cache'}"],
  }

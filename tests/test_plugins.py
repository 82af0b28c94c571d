"""A model and a dataset from outside the package, through the CLI.

The example plug-ins of docs/extending.md (experiments/plugin_example/my_plugins), copied
away from the repository, named by dotted module paths; the dataset calls its
splits 'dev' and 'final' (the trainer evaluates the first during training,
all at the end).
"""

import os
import shutil
import subprocess
import sys

import pytest

from codistill_jax import metrics
from codistill_jax import paths
from tests.test_train import ROOT

EXAMPLE = os.path.join(ROOT, "experiments", "plugin_example")


@pytest.fixture
def plugins(tmp_path):
  """A copy of experiments/plugin_example: code nowhere near the package."""
  shutil.copytree(EXAMPLE, tmp_path / "example")
  return tmp_path / "example"


def _cli(plugins, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
         "PYTHONPATH": os.pathsep.join([str(plugins), ROOT])}
  return subprocess.run(
      [sys.executable, "-m", "codistill_jax.main",
       f"--config={plugins / 'my_config.py'}", *args], cwd=str(plugins),
      env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_model_and_dataset_of_your_own_train_through_the_cli(plugins):
  workdir = str(plugins / "run")
  result = _cli(plugins, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  rows = metrics.read_jsonl(paths.metrics_file(workdir, 0))
  evals = {r["step"]: r for r in rows if any("/" in k for k in r)}
  assert "dev/accuracy" in evals[6] and "final/accuracy" not in evals[6]
  assert {"dev/accuracy", "final/accuracy"} <= set(evals[12])


@pytest.mark.slow
def test_a_missing_or_bad_plug_in_is_one_line(plugins):
  for flag, match in [
      ("--config.model_name=my_plugins.nope", "config.model_name="
       "'my_plugins.nope' is not an importable module"),
      ("--config.model.width=0", "config.model.width=0 must be greater"),
      ("--config.data.name=no_such_pkg.data", "config.data.name="
       "'no_such_pkg.data' is not an importable module")]:
    result = _cli(plugins, f"--workdir={plugins / 'bad'}", flag)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: " + match), result.stderr
    assert "Traceback" not in result.stderr
  assert not (plugins / "bad").exists()

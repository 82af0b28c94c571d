"""A model and a dataset from outside the package, through the CLI.

The plug-ins live in a package of the test's own (tmp_path/my_plugins), are
named by dotted module paths, and the dataset calls its splits 'dev' and
'final' (the trainer evaluates the first during training, all at the end).
"""

import os
import subprocess
import sys
import textwrap

import pytest

from codistill_jax import metrics
from codistill_jax import paths
from tests.test_train import ROOT

MODEL = '''
import flax.linen as nn

RANGES = {"width": "> 0"}


class Model(nn.Module):
  num_classes: int
  width: int = 8

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.width)(x)))
'''

DATA = '''
import numpy as np

from codistill_jax.data import pipeline

RANGES = {"num_examples": "> 0"}


def get_datasets(config, *, group, num_groups, process_index, process_count):
  rng = np.random.default_rng(0)
  n = config.data.num_examples
  x = rng.normal(size=(n, 4)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)

  def split(rows):
    return pipeline.ArraySplit(len(rows), lambda i: {
        "inputs": x[rows[i]], "labels": y[rows[i]],
        "weights": np.ones(len(i), np.float32)})

  rows = np.arange(n)
  splits = {"train": split(rows[:-40]), "dev": split(rows[-40:-20]),
            "final": split(rows[-20:])}
  return pipeline.assemble(config, splits, {"num_classes": 2}, group=group,
                           num_groups=num_groups, process_index=process_index,
                           process_count=process_count)
'''

CONFIG = '''
from codistill_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.model_name = "my_plugins.my_model"
  c.model.width = 16
  c.data.name = "my_plugins.my_data"
  c.data.num_examples = 200
  c.data.batch_size = 16
  c.data.eval_batch_size = 20
  c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 12, 4, 6, 12
  return c
'''


@pytest.fixture
def plugins(tmp_path):
  pkg = tmp_path / "my_plugins"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "my_model.py").write_text(textwrap.dedent(MODEL))
  (pkg / "my_data.py").write_text(textwrap.dedent(DATA))
  (tmp_path / "my_config.py").write_text(textwrap.dedent(CONFIG))
  return tmp_path


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

"""The plot command draws runs (codistill_jax/tools/plot.py)."""

import os
import subprocess
import sys

import pytest

from codistill_jax import metrics
from codistill_jax import paths
from codistill_jax.tools import plot
from codistill_jax.errors import ConfigError
from tests.test_train import ROOT


def _fake_run(root, name, groups=2, seed=0):
  """A run directory with the metrics a codistillation run writes."""
  workdir = str(root / name)
  for g in range(groups):
    w = metrics.MetricWriter(paths.group_dir(workdir, g))
    for step in range(10, 110, 10):
      row = {"loss": 1.0 / step + seed, "task_loss": 0.9 / step,
             "alpha": float(step > 30)}
      if step > 30:
        row.update({"distill_loss": 0.1, "peer_agreement": 0.8,
                    f"staleness/group_{1 - g}": 5.0,
                    f"staleness_max/group_{1 - g}": 9.0})
      w.write(step, row)
      if step % 50 == 0:
        w.write(step, {"validation/loss": 0.5, "validation/accuracy": 0.8})
    w.close()
  return workdir


def test_draws_every_panel_of_one_and_several_runs(tmp_path):
  a, b = _fake_run(tmp_path, "a"), _fake_run(tmp_path, "b", seed=1)
  out = str(tmp_path / "plots")
  written = plot.draw({"a": plot.load_run(a), "b": plot.load_run(b)}, out)
  names = sorted(os.path.basename(p) for p in written)
  assert names == ["agreement.png", "distill.png", "eval.png", "loss.png",
                   "staleness.png"]
  for p in written:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(p) > 10_000


def test_a_baseline_run_has_no_distillation_panels(tmp_path):
  w = metrics.MetricWriter(paths.group_dir(str(tmp_path / "plain"), 0))
  w.write(10, {"loss": 1.0})
  w.close()
  written = plot.draw({"plain": plot.load_run(str(tmp_path / "plain"))},
                      str(tmp_path / "p"))
  assert [os.path.basename(p) for p in written] == ["loss.png"]


def test_the_command_prints_the_paths_and_refuses_a_non_run(tmp_path):
  workdir = _fake_run(tmp_path, "run")
  result = subprocess.run([sys.executable, "-m", "codistill_jax.tools.plot",
                           workdir], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.split()
  assert lines and all(os.path.exists(p) and p.startswith(
      os.path.join(workdir, "plots")) for p in lines)
  with pytest.raises(ConfigError, match="no group_<g>/metrics.jsonl"):
    plot.load_run(str(tmp_path))

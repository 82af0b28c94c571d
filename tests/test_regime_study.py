"""experiments/regime_study.py end to end at toy size (its `--smoke`)."""

import json
import os
import subprocess
import sys

import pytest

from tests.test_train import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import regime_study  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _study(tmp_path, preset, *extra):
  report = tmp_path / "REPORT.md"
  report.write_text("# Report\n\nkept text\n")
  cmd = [sys.executable, "experiments/regime_study.py", f"--preset={preset}",
         "--smoke", f"--root={tmp_path / 'runs'}", f"--report={report}",
         f"--results={tmp_path / 'results'}", *extra]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True,
                 timeout=900)
  return cmd, env, report


@pytest.mark.slow
def test_gpu_lm_study_runs_at_toy_size_with_one_process_per_group(tmp_path):
  """The GPU command's pipeline (configs/lm.py's 125m family, groups as
  processes sharing the devices, as on one GPU), every method, on a CPU."""
  cmd, env, report = _study(tmp_path, "gpu_lm")
  out = json.load(open(tmp_path / "results" / "regime_study_gpu_lm.json"))
  assert set(out["summary"]) == set(regime_study._methods(4, 4, False))
  for m, r in out["summary"].items():
    assert r["steps_to_target"] == [4.0], m  # A target every run reaches.
    assert len(r["final"]) == 1
  assert out["summary"]["codistill 2xB"]["comm_bytes_per_step"] == (
      2 * out["param_bytes"] / 4)
  # The launcher ran the groups as processes: one log per group.
  wd = out["curves"] and next(
      d for d in os.listdir(tmp_path / "runs" / os.listdir(
          tmp_path / "runs")[0]) if "method=average" in d)
  assert wd
  text = report.read_text()
  assert text.startswith("# Report\n\nkept text\n")
  assert text.count("<!-- regime_study:gpu_lm -->") == 1
  assert (tmp_path / "report" / "regime_gpu_lm.png").exists()
  # A rerun reuses every finished run and replaces its section in place.
  subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True,
                 timeout=300)
  assert report.read_text().count("<!-- regime_study:gpu_lm -->") == 1


@pytest.mark.slow
def test_fashion_study_runs_at_toy_size(tmp_path, small_data):
  path = small_data["fashion_mnist"][0].split("=", 1)[1]
  _study(tmp_path, "fashion", f"--set=data.path={path}",
         "--set=data.validation_size=100")
  out = json.load(open(tmp_path / "results" / "regime_study_fashion.json"))
  assert out["saturated_batch"] == 4  # Every run reaches the target at once.
  assert out["ladder"]["4"]["b_simple"]  # The noise scale was logged.


def test_comm_model():
  p = 1000
  assert regime_study.comm_bytes_per_step("sync B", 1, 1, p, 10) == 0
  # Two workers' ring all-reduce: the params out and in once each.
  assert regime_study.comm_bytes_per_step("sync 2B", 1, 2, p, 10) == 2 * p
  assert regime_study.comm_bytes_per_step("codistill 2xB", 2, 1, p, 10) == (
      2 * p / 10)


def test_steps_to_interpolates():
  assert regime_study.steps_to({10: 1.0, 20: 0.5}, 0.75) == 15.0
  assert regime_study.steps_to({10: 1.0, 20: 0.9}, 0.5) is None

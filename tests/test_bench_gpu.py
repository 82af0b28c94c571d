"""experiments/bench_gpu.py at `:quick` size on the CPU: the baseline and
codistillation steps run side by side and the JSON holds their figures."""

import json
import os
import subprocess
import sys

import pytest

from tests.test_train import ROOT


@pytest.mark.slow  # Two LM steps compiled and timed in a subprocess.
def test_bench_gpu_quick_on_cpu(tmp_path):
  out = tmp_path / "bench_gpu.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "experiments/bench_gpu.py", "--quick",
       "--sizes=125m", "--groups=3", "--steps=2", "--warmup=1",
       "--batch_size=4", f"--out={out}"], cwd=ROOT,
      env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  (row,) = json.loads(out.read_text())["rows"]
  assert row["config"] == "lm_125m:quick" and row["G"] == 3
  assert row["batch_size"] == 4 and row["teacher_dtype"] == "bfloat16"
  for key in ("baseline", "codistill"):
    assert row[f"{key}_ms"] > 0 and 0 < row[f"{key}_mfu"] < 1
    assert row[f"{key}_tokens_per_s"] == pytest.approx(
        4 * row["seq_len"] / (row[f"{key}_ms"] / 1e3))
  assert row["floor_ms"] == pytest.approx(
      row["baseline_ms"] + 2 * row["teacher_forward_ms"])
  assert row["codistill_over_floor"] == pytest.approx(
      row["codistill_ms"] / row["floor_ms"])
  assert "lm_125m:quick" in result.stdout

"""The gradient noise scale: its estimators, the trainer's metric, the study."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codistill_jax import metrics
from codistill_jax import noise_scale
from codistill_jax import train
from codistill_jax.errors import ConfigError
from tests.test_train import ROOT, load_config


def _linear_problem(mu, sigma, d, rows, batches, seed=0):
  """loss = -mean_i w.x_i: the per-example gradient is -x_i, so |G|^2 =
  |mu|^2 and tr(Sigma) = d sigma^2 exactly."""
  apply_fn = lambda p, x, **kw: x @ p["w"]
  loss_fn = lambda logits, batch: (-jnp.mean(logits), {})
  rng = np.random.default_rng(seed)
  xs = mu + sigma * rng.standard_normal((batches, rows, d)).astype(np.float32)
  return apply_fn, loss_fn, xs


@pytest.mark.parametrize("pieces", [2, 4])
def test_estimators_recover_a_known_noise_scale(pieces):
  d, mu, sigma = 16, 0.25, 1.0
  apply_fn, loss_fn, xs = _linear_problem(mu, sigma, d, rows=64, batches=400)
  fn = jax.jit(noise_scale.make_noise_scale_fn(apply_fn, loss_fn, pieces))
  params = {"w": jnp.zeros((d,))}
  out = [fn(params, {"inputs": x}, jax.random.PRNGKey(0)) for x in xs]
  means = {k: float(np.mean([o[k] for o in out])) for k in out[0]}
  np.testing.assert_allclose(means["noise_scale/grad_sq"], d * mu**2,
                             rtol=0.1)
  np.testing.assert_allclose(means["noise_scale/trace"], d * sigma**2,
                             rtol=0.1)
  b = noise_scale.summarize(means, 64)["noise_scale/b_simple"]
  np.testing.assert_allclose(b, sigma**2 / mu**2, rtol=0.15)  # = 16 rows.


def test_doubling_speedup_goes_from_2_to_1():
  assert noise_scale.doubling_speedup(1e9, 8) == pytest.approx(2.0, 1e-6)
  assert noise_scale.doubling_speedup(0.0, 8) == 1.0
  # At B = B_noise: (1 + 1) / (1 + 1/2).
  assert noise_scale.doubling_speedup(64, 64) == pytest.approx(4 / 3)
  # Noise swamping the signal (|G|^2 <= 0): unbounded B_simple.
  assert noise_scale.summarize({"noise_scale/grad_sq": -1.0,
                                "noise_scale/trace": 3.0}, 8)[
                                    "noise_scale/b_simple"] == float("inf")


@pytest.mark.slow
def test_trainer_logs_it_and_the_study_command_reports_it(tmp_path):
  config = load_config("flights")
  config.total_steps, config.log_every = 12, 4
  config.noise_scale.every = 2
  train.train_and_evaluate(config, str(tmp_path))
  rows = [r for r in metrics.read_jsonl(
      str(tmp_path / "group_0" / "metrics.jsonl")) if "loss" in r]
  assert [r["step"] for r in rows if "noise_scale/b_simple" in r] == [4, 8,
                                                                      12]
  for r in rows:
    assert r["noise_scale/trace"] > 0
    assert 1.0 <= r["noise_scale/doubling_speedup"] <= 2.0
  # The study command, on that run (reads only).
  out = subprocess.run(
      [sys.executable, "-m", "codistill_jax.tools.noise_scale",
       f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120, check=True)
  assert "median B_simple over the second half" in out.stdout
  summary = json.load(open(tmp_path / "noise_scale_group_0.json"))
  assert [r["step"] for r in summary["rows"]] == [4, 8, 12]
  assert summary["batch_size"] == config.data.batch_size


@pytest.mark.slow
def test_study_command_errors_name_the_fix(tmp_path):
  config = load_config("flights")
  config.total_steps = 4
  train.train_and_evaluate(config, str(tmp_path))  # No noise scale logged.
  out = subprocess.run(
      [sys.executable, "-m", "codistill_jax.tools.noise_scale",
       f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert out.returncode == 2
  assert "noise_scale.every" in out.stderr and "Traceback" not in out.stderr


def test_pieces_that_do_not_divide_the_batch_are_a_config_error(tmp_path):
  config = load_config("flights")
  config.noise_scale.every = 2
  config.noise_scale.pieces = 7
  with pytest.raises(ConfigError, match="config.noise_scale.pieces=7"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()

"""Visible speed: FLOPs and MFU, the prefetch thread, the profile trace."""

import glob
import os
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codistill_jax import config_lib
from codistill_jax import metrics
from codistill_jax import paths
from codistill_jax import perf
from codistill_jax import train
from codistill_jax.data import pipeline
from codistill_jax.errors import ConfigError


def test_step_flops_counts_a_matmul():
  x = jax.ShapeDtypeStruct((64, 32), jnp.float32)
  y = jax.ShapeDtypeStruct((32, 16), jnp.float32)
  assert perf.step_flops(jax.jit(jnp.matmul), x, y) == pytest.approx(
      2 * 64 * 32 * 16, rel=0.05)


@pytest.mark.parametrize("kind,peak", [("TPU v5 lite", 197e12),
                                       ("TPU v5p", 459e12),
                                       ("TPU v6 lite", 918e12),
                                       ("NVIDIA H100 80GB HBM3", 989e12),
                                       ("Some new chip", 0.0)])
def test_peak_of_an_accelerator_comes_from_the_table(kind, peak):
  device = types.SimpleNamespace(device_kind=kind, platform="tpu")
  assert perf.peak_flops(device) == peak


def test_cpu_peak_is_measured_once_and_cached(tmp_path):
  peak = perf.peak_flops(jax.devices()[0], cache_dir=str(tmp_path))
  assert 1e8 < peak < 1e14
  (cached,) = glob.glob(str(tmp_path / "cpu_peak-*.json"))
  perf._cpu_peak.cache_clear()  # pylint: disable=protected-access
  with open(cached, "w") as f:
    f.write('{"flops": 1234.0}')
  assert perf.peak_flops(jax.devices()[0], cache_dir=str(tmp_path)) == 1234.0


def test_mfu():
  assert perf.mfu(1e9, 10.0, 2, 1e10) == pytest.approx(0.5)
  assert perf.mfu(0.0, 10.0, 2, 1e10) == 0.0  # Unknown FLOPs: no MFU.


@pytest.mark.parametrize("depth", [0, 2])  # 0: made in the loop's thread.
def test_prefetch_keeps_order_and_raises_where_the_batch_was(depth):
  def batches():
    for i in range(5):
      yield {"x": np.full((2,), i)}
    raise ValueError("bad record 5")

  feed = pipeline.Prefetch(batches(), lambda b: b["x"] * 10, depth=depth)
  assert [int(next(feed)[0]) for _ in range(5)] == [0, 10, 20, 30, 40]
  with pytest.raises(ValueError, match="bad record 5"):
    next(feed)


def test_prefetch_close_stops_its_thread():
  made = []

  def endless():
    i = 0
    while True:
      made.append(i)
      yield i
      i += 1

  feed = pipeline.Prefetch(endless(), lambda b: b, depth=2)
  assert next(feed) == 0
  feed.close()  # Returns once the thread has ended.
  assert not any(t.name == "prefetch" and t.is_alive()
                 for t in threading.enumerate())
  assert len(made) <= 5  # It stopped at the queue's depth, not ran on.


@pytest.mark.slow
def test_progress_shows_throughput_and_mfu_and_a_profile_is_written(
    tmp_path, caplog):
  caplog.set_level("INFO")
  config = config_lib.load(f"{config_lib.config_path('flights')}:quick",
                           lock=False)
  config.total_steps, config.log_every, config.eval_every = 6, 2, 6
  config.eval_max_batches = 1
  # The batches through the prefetch thread (the default leaves 8 fake CPU
  # devices on a small host without one), which must end with the run.
  config.data.prefetch = 2
  train.train_and_evaluate(config, str(tmp_path), profile_steps=(2, 4))
  assert not any(t.name == "prefetch" and t.is_alive()
                 for t in threading.enumerate())
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith("step ")]
  assert lines and all("examples/s per group" in l and "MFU" in l
                       for l in lines), lines
  rows = [r for r in metrics.read_jsonl(str(tmp_path / "group_0" /
                                            "metrics.jsonl"))
          if "examples_per_sec" in r]
  assert rows and all(r["examples_per_sec"] > 0 and 0 < r["mfu"] < 1
                      for r in rows)
  # A trace TensorBoard's profile plugin opens: plugins/profile/<run>/*.xplane.pb
  traces = glob.glob(os.path.join(paths.profile_dir(str(tmp_path)), "**",
                                  "*.xplane.pb"), recursive=True)
  assert traces and os.path.getsize(traces[0]) > 0


def test_a_profile_past_the_last_step_is_a_config_error(tmp_path):
  config = config_lib.load(f"{config_lib.config_path('flights')}:quick",
                           lock=False)
  with pytest.raises(ConfigError, match="--profile_steps"):
    train.train_and_evaluate(config, str(tmp_path),
                             profile_steps=(1, config.total_steps + 1))
  assert not os.listdir(tmp_path)  # Nothing written.


def test_the_loop_lowers_the_thread_switch_interval_and_restores_it():
  import sys  # pylint: disable=g-import-not-at-top
  before = sys.getswitchinterval()
  with perf.prompt_threads(1e-4):
    assert sys.getswitchinterval() == pytest.approx(1e-4)
  assert sys.getswitchinterval() == before


def test_the_default_prefetch_leaves_busy_cpu_cores_alone():
  cpu = types.SimpleNamespace(platform="cpu")
  tpu = types.SimpleNamespace(platform="tpu")
  cores = os.cpu_count() or 1
  assert pipeline.prefetch_depth(-1, [cpu] * cores) == 0
  assert pipeline.prefetch_depth(-1, [tpu] * cores) == 2
  if cores > 1:
    assert pipeline.prefetch_depth(-1, [cpu] * (cores - 1)) == 2
  assert pipeline.prefetch_depth(3, [cpu] * cores) == 3  # Asked for.

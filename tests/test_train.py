"""The trainer end to end: CLI runs, exact resume, NaN stop, bad input."""

import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from codistill_jax import build
from codistill_jax import config_lib
from codistill_jax import data as data_lib
from codistill_jax import mesh as mesh_lib
from codistill_jax import metrics
from codistill_jax import train
from codistill_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg="quick"):
  """configs/<name>.py:arg, unlocked so that tests may adjust it."""
  return config_lib.load(f"{config_lib.config_path(name)}:{arg or ''}",
                         lock=False)


def run_cli(workdir, config, *overrides, timeout=300, wait=True):
  cmd = [sys.executable, "-m", "codistill_jax.main", f"--config={config}",
         f"--workdir={workdir}", *overrides]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def restore_params(workdir, step, group=0):
  path = os.path.join(workdir, f"group_{group}", "checkpoints", str(step),
                      "default")
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path).item_metadata
    # Saved by another job maybe (other devices): restore onto one device.
    args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=one_device),
                        meta.tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(
        restore_args=args))["params"]


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------
# Exact resume.
# ---------------------------------------------------------------------------
def _sigterm_self_when(path, min_step):
  """Sends SIGTERM to this process once metrics.jsonl reaches `min_step`."""

  def watch():
    for _ in range(6000):
      if os.path.exists(path) and any(
          r["step"] >= min_step for r in metrics.read_jsonl(path)):
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.01)

  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  return thread


@pytest.mark.slow
def test_resume_after_sigterm_is_bitwise_equal(tmp_path):
  config = load_config("flights")
  config.total_steps, config.log_every = 60, 1
  config.checkpoint_every, config.eval_every = 1000, 1000
  config.model.dropout_rate = 0.3  # The rng stream must resume too.

  straight = str(tmp_path / "straight")
  train.train_and_evaluate(config, straight)

  interrupted = str(tmp_path / "interrupted")
  watcher = _sigterm_self_when(
      os.path.join(interrupted, "group_0", "metrics.jsonl"), 10)
  train.train_and_evaluate(config, interrupted)
  watcher.join()
  steps = sorted(int(d) for d in os.listdir(
      os.path.join(interrupted, "group_0", "checkpoints")) if d.isdigit())
  assert steps and steps[-1] < 60, "SIGTERM should have stopped the run early"
  train.train_and_evaluate(config, interrupted)  # Resumes.
  assert_trees_equal(restore_params(straight, 60),
                     restore_params(interrupted, 60))


def test_nan_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
  config = load_config("flights")
  config.optimizer.name, config.optimizer.learning_rate = "sgd", 1e30
  config.optimizer.schedule = "constant"
  config.total_steps, config.log_every, config.checkpoint_every = 20, 1, 1
  with pytest.raises(FloatingPointError, match=r"at step \d+"):
    train.train_and_evaluate(config, str(tmp_path))
  ckpts = str(tmp_path / "group_0" / "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  for s in steps:  # Every committed checkpoint is finite.
    params = restore_params(str(tmp_path), s)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_resume_prefers_own_checkpoint_over_init_checkpoint(tmp_path):
  config = load_config("flights")
  config.total_steps = 10
  first = str(tmp_path / "first")
  train.train_and_evaluate(config, first)

  # A new run starting from `first` begins at step 0 with first's params.
  config.init_checkpoint = first
  config.total_steps = 5
  second = str(tmp_path / "second")
  train.train_and_evaluate(config, second)
  # Its own checkpoint (step 5) now wins over the init checkpoint: a rerun
  # with more steps continues from 5, and does not restart from `first`.
  config.total_steps = 5
  train.train_and_evaluate(config, second)
  assert sorted(int(d) for d in os.listdir(
      os.path.join(second, "group_0", "checkpoints")) if d.isdigit()) == [5]


@pytest.mark.slow
def test_init_checkpoint_of_another_architecture_is_a_config_error(tmp_path):
  config = load_config("flights")
  config.total_steps = 5
  train.train_and_evaluate(config, str(tmp_path / "a"))
  config.model.hidden_sizes = (7,)
  config.init_checkpoint = str(tmp_path / "a")
  with pytest.raises(ConfigError, match="init_checkpoint"):
    train.train_and_evaluate(config, str(tmp_path / "b"))


def test_eval_max_batches_caps_an_evaluation_and_says_so(tmp_path, caplog):
  caplog.set_level("INFO")
  config = load_config("flights")
  config.total_steps, config.eval_every, config.eval_max_batches = 4, 2, 1
  config.data.eval_batch_size = 256  # The validation split is ~130 batches.
  train.train_and_evaluate(config, str(tmp_path))
  rows = [r for r in metrics.read_jsonl(str(tmp_path / "group_0" /
                                            "metrics.jsonl"))
          if "validation/log_loss" in r]
  assert [r["validation/batches"] for r in rows] == [1, 1]
  assert rows[-1]["test/batches"] == 1
  assert any("of its" in r.getMessage() and "eval_max_batches" in
             r.getMessage() for r in caplog.records)


def test_state_and_batch_are_laid_out_as_the_rules_say():
  config = load_config("flights")
  config.sharding.rules = ((".*kernel", "fsdp"),)
  config.sharding.fsdp_min_size = 64
  mesh = mesh_lib.make_mesh(jax.devices())
  datasets = data_lib.get_module("flights").get_datasets(
      config, group=0, num_groups=1, process_index=0, process_count=1)
  setup = build.build(config, datasets, mesh)
  state = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(
      jax.random.PRNGKey(0))
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  for path, leaf in flat:
    name = mesh_lib.path_str(path)
    shard_shapes = {s.data.shape for s in leaf.addressable_shards}
    if name.endswith("kernel") and leaf.size >= 64 and any(
        d % 8 == 0 for d in leaf.shape):
      assert leaf.sharding.spec != jax.sharding.PartitionSpec(), name
      assert all(np.prod(s) == leaf.size // 8 for s in shard_shapes), name
    else:
      assert shard_shapes == {leaf.shape}, name  # Replicated.
  # Adam moments follow their parameter.
  mu = state.opt_state[-1][0].mu if hasattr(state.opt_state[-1][0], "mu") else None
  if mu is not None:
    for (_, p), (_, m) in zip(flat, jax.tree_util.tree_flatten_with_path(mu)[0]):
      assert p.sharding.spec == m.sharding.spec
  batch = mesh_lib.shard_batch(next(iter(datasets.train(0))),
                               mesh_lib.batch_sharding(mesh))
  assert {s.data.shape[0] for s in batch["labels"].addressable_shards} == {
      config.data.batch_size // 8}


# ---------------------------------------------------------------------------
# The CLI.
# ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["flights", "fashion_mnist", "kernel_lm"])
def test_quick_config_runs_through_the_cli(name, tmp_path, small_data):
  overrides = small_data.get(name, [])
  result = run_cli(str(tmp_path), f"configs/{name}.py:quick", *overrides)
  assert result.returncode == 0, result.stdout + result.stderr
  rows = metrics.read_jsonl(str(tmp_path / "group_0" / "metrics.jsonl"))
  total = load_config(name).total_steps
  final = [r for r in rows if r["step"] == total and any(
      k.startswith("test/") for k in r)]
  assert final, rows
  assert os.path.isdir(tmp_path / "group_0" / "checkpoints" / str(total))


@pytest.mark.slow
def test_cli_sigterm_saves_and_the_rerun_finishes(tmp_path):
  # With the prefetch thread (8 fake CPU devices get none by default): a
  # stop must end it before the process exits, or the exit aborts.
  args = (str(tmp_path), "configs/flights.py:quick", "--config.total_steps=400",
          "--config.log_every=1", "--config.checkpoint_every=1000",
          "--config.data.prefetch=2")
  proc = run_cli(*args, wait=False)
  log = tmp_path / "group_0" / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and not (
      log.exists() and metrics.read_jsonl(str(log))):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  steps = [int(d) for d in os.listdir(tmp_path / "group_0" / "checkpoints")
           if d.isdigit()]
  assert steps and max(steps) < 400
  result = run_cli(*args)
  assert result.returncode == 0, result.stderr
  assert "resumed from its own checkpoint" in result.stderr


# Bad flags, configs, data and checkpoints through the CLI: test_bad_input.py.

"""Groups that differ: per-group settings, teachers of several architectures,
one-way and weighted teachers, groups that join and leave (docs/groups.md)."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codistill_jax import cli
from codistill_jax import config_lib
from codistill_jax import distill
from codistill_jax import exchange
from codistill_jax import metrics
from codistill_jax import paths
from codistill_jax import step as step_lib
from codistill_jax import teachers
from codistill_jax import train
from codistill_jax import validate
from codistill_jax.errors import ConfigError
from tests.test_codistill import codistill_config
from tests.test_train import restore_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HETERO = os.path.join(ROOT, "configs", "flights_hetero.py")


def _rows(workdir, group):
  return [r for r in metrics.read_jsonl(
      paths.metrics_file(str(workdir), group)) if "loss" in r]


# ----------------------------------------------------------------------------
# The group table.
# ----------------------------------------------------------------------------
def test_a_group_sets_only_what_differs_in_the_file_and_on_the_command_line():
  c = config_lib.load(f"{HETERO}:quick", [
      "group.g1.model.hidden_sizes=(4,)", "group.g0.optimizer.b1=0.5"])
  wide, narrow = config_lib.group_config(c, 0), config_lib.group_config(c, 1)
  assert narrow.model.hidden_sizes == (4,)  # The command line wins.
  assert narrow.model.embed_dim == 2  # From the file's entry.
  assert narrow.model.dropout_rate == c.model.dropout_rate  # Shared.
  assert narrow.optimizer.learning_rate == 4e-3
  assert narrow.codistill.exchange_every == 10
  assert wide.optimizer.b1 == 0.5 and wide.model == c.model
  assert not narrow.group  # The config of one group.
  plain = config_lib.load("configs/flights.py:quick,groups=2")
  assert config_lib.group_config(plain, 1) is plain  # Nothing set: itself.
  # Another model: its fields start from empty, not the shared model's.
  other = config_lib.load("configs/flights.py:quick,groups=2", [
      "group.g1.model_name=tests.tiny_model", "group.g1.model.width=3"])
  assert config_lib.group_config(other, 1).model.to_dict() == {"width": 3}


def test_the_config_flag_creates_a_group_entry_the_file_did_not_write(
    monkeypatch):
  monkeypatch.setattr(sys, "argv", [
      "main", "--config=configs/flights.py:quick,groups=2",
      "--config.group.g1.model.hidden_sizes=(8, 2)",
      "--config.group.g1.data.batch_size=32"])
  config = cli._ConfigFileParser("config").parse(
      "configs/flights.py:quick,groups=2")
  assert config.group.g1.model.hidden_sizes == (8, 2)
  assert config_lib.group_config(config, 1).data.batch_size == 32
  assert config.is_locked


@pytest.mark.parametrize("overrides,message", [
    (["group.g5.devices=1"], "config.group.g5: there is no group 5"),
    (["group.g1.data.name=mnist"], "config.group.g1.data.name: a group "
     "cannot set this field (the groups share their data"),
    (["group.g1.total_steps=5"], "config.group.g1.total_steps: a group "
     "cannot set"),
    (["group.g0.devices=6", "group.g1.devices=4"],
     "config.group.g0.devices=6 and config.group.g1.devices=4 add up to 10, "
     "not the 8 devices"),
    (["group.g0.devices=8"], "config.group.g0.devices=8 leave 0 of the 8 "
     "devices for the 1 other group(s) [1]"),
    (["codistill.teacher_weighting=best"],
     "config.codistill.teacher_weighting='best' is unknown"),
    (["group.g1.codistill.teacher_weighting=best"],
     "config.group.g1.codistill.teacher_weighting='best' is unknown"),
    (["codistill.method=average", "group.g1.model.hidden_sizes=(4,)"],
     "config.group.g1.model.hidden_sizes: parameter averaging"),
    (["codistill.method=average", "codistill.averaging.quorum=3"],
     "config.codistill.averaging.quorum=3 exceeds the 2 groups"),
    (["group.g1.model.hidden_sizes=(0,)"],
     "config.group.g1.model.hidden_sizes=(0,) must be each greater than 0"),
    (["group.g1.optimizer.learning_rate=0.0", "group.g1.optimizer.b1=0.5"],
     "config.group.g1.optimizer.learning_rate=0.0 must be greater than 0"),
    (["group.g1.data.batch_size=30", "group.g1.devices=4",
      "group.g0.devices=4"],
     "config.group.g1.data.batch_size=30 is not divisible by the 4 devices"),
    (["codistill.join_warmup_steps=5"], "config.codistill.join_warmup_steps"
     "=5 never acts"),
])
def test_bad_groups_are_one_line_naming_the_group_and_field(overrides,
                                                            message):
  config = config_lib.load("configs/flights.py:quick,groups=2", overrides)
  with pytest.raises(ConfigError) as e:
    validate.validate(config, num_devices=8)
  assert message in str(e.value), str(e.value)
  assert "\n" not in str(e.value)


def test_groups_of_another_output_space_are_refused_naming_both():
  config = config_lib.load("configs/flights.py:quick,groups=2",
                           ["group.g1.model.hidden_sizes=(4,)"])
  with pytest.raises(ConfigError, match=r"groups 0 and 1 do not share an "
                     r"output space: group 0's model predicts \(1, 10\), "
                     r"group 1's \(1, 12\) \(config.group.g1.model."
                     "hidden_sizes\\)"):
    teachers.check_output_spaces(config, {0: (1, 10), 1: (1, 12)})
  teachers.check_output_spaces(config, {0: (1, 10), 1: (1, 10)})


def test_a_joining_group_needs_the_running_run(tmp_path):
  config = codistill_config()
  with config.unlocked():
    config.codistill.max_groups = 3
  with pytest.raises(ConfigError, match="--groups=2 joins a running run, but "
                     "the exchange dir .* holds no run"):
    train.train_and_evaluate(config, str(tmp_path), groups=[2])
  assert os.listdir(tmp_path) == []  # Nothing written.
  with pytest.raises(ConfigError, match=r"--groups=\[3\] must name groups "
                     r"in 0..2"):
    train.train_and_evaluate(config, str(tmp_path), groups=[3])


# ----------------------------------------------------------------------------
# Teachers of several architectures; weights.
# ----------------------------------------------------------------------------
def test_teachers_of_two_architectures_pool_their_probabilities():
  x = jnp.array([[0.5, -1.0], [2.0, 0.3]])
  wide = lambda p, x, train=False: x @ p["w"]
  narrow = lambda p, x, train=False: jnp.tanh(x) @ p["v"] + p["b"][None]
  rng = np.random.default_rng(0)
  a = step_lib.Teachers({"w": jnp.asarray(rng.normal(size=(2, 2, 3)),
                                          jnp.float32)},
                        jnp.array([1.0, 0.0]))  # Its second slot: empty.
  b = step_lib.Teachers({"v": jnp.asarray(rng.normal(size=(1, 2, 3)),
                                          jnp.float32),
                         "b": jnp.ones((1, 3))}, jnp.array([3.0]))
  term = distill.Dense((wide, narrow), lambda s: 1.0)
  target, has = term.target((a, b), {"inputs": x})
  pa = jax.nn.softmax(wide({"w": a.params["w"][0]}, x))
  pb = jax.nn.softmax(narrow({"v": b.params["v"][0], "b": b.params["b"][0]},
                             x))
  np.testing.assert_allclose(target["probs"], (pa + 3 * pb) / 4, rtol=1e-6)
  assert bool(has)


def test_teacher_weights_uniform_freshness_and_validation_loss():
  held = [10, None, 5]
  np.testing.assert_allclose(teachers.teacher_weights(
      "uniform", held, 15, 5, [None] * 3, 0.1), [1, 0, 1])
  # Staleness 5 and 10 at an interval of 5: 1/2 and 1/3.
  np.testing.assert_allclose(teachers.teacher_weights(
      "freshness", held, 15, 5, [None] * 3, 0.1), [1 / 2, 0, 1 / 3])
  # A loss 0.1 worse at temperature 0.1 weighs e^-1 as much.
  np.testing.assert_allclose(teachers.teacher_weights(
      "val_loss", held, 15, 5, [0.5, None, 0.6], 0.1), [1, 0, np.exp(-1)])
  # Uniform until every held peer has published a loss.
  np.testing.assert_allclose(teachers.teacher_weights(
      "val_loss", held, 15, 5, [0.5, None, None], 0.1), [1, 0, 1])


# ----------------------------------------------------------------------------
# Runs.
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_wide_and_a_narrow_group_on_6_and_2_devices_exchange(tmp_path):
  config = config_lib.load(f"{HETERO}:quick,devices=6+2", [
      "codistill.exchange_blocking=True", "codistill.burn_in_steps=0",
      "codistill.teacher_weighting=val_loss", "eval_every=5"])
  train.train_and_evaluate(config, str(tmp_path))
  wide, narrow = _rows(tmp_path, 0), _rows(tmp_path, 1)
  # Each restored the other by the other's architecture and distilled.
  assert max(r.get("teacher_step/group_1", -1) for r in wide) == 10
  assert max(r.get("teacher_step/group_0", -1) for r in narrow) == 10
  assert all(r["distill_loss"] > 0 for r in wide if r["step"] > 10)
  assert not any(r.get("restore_failures/group_1") for r in wide)
  assert {r["devices"] for r in wide} == {6}
  assert {r["devices"] for r in narrow} == {2}
  # The manifest on the exchange records each group's architecture.
  run_dir = os.path.join(tmp_path, "runs", os.listdir(tmp_path / "runs")[0])
  members = exchange.read_members(run_dir)
  assert members[0]["model"]["hidden_sizes"] == [32]
  assert members[1]["model"]["hidden_sizes"] == [16]
  assert members[1]["devices"] == 2 and members[1]["status"] == "left"
  assert members[1]["step"] == 20


@pytest.mark.slow
def test_alpha_0_leaves_the_big_group_exactly_as_trained_alone(tmp_path):
  oneway = config_lib.load(f"{HETERO}:quick,oneway",
                           ["codistill.exchange_blocking=True"])
  train.train_and_evaluate(oneway, str(tmp_path / "oneway"))
  # Alone: the same groups, neither distilling (no teacher reaches either).
  alone = config_lib.load(f"{HETERO}:quick,oneway", [
      "codistill.exchange_blocking=True", "group.g1.codistill.alpha=0.0"])
  train.train_and_evaluate(alone, str(tmp_path / "alone"))
  same = jax.tree.map(np.array_equal, restore_params(str(tmp_path / "oneway"),
                                                     20, 0),
                      restore_params(str(tmp_path / "alone"), 20, 0))
  assert all(jax.tree.leaves(same))
  # ...while the small one learned from it.
  assert any(r.get("distill_loss", 0) > 0
             for r in _rows(tmp_path / "oneway", 1))
  assert not any("distill_loss" in r for r in _rows(tmp_path / "oneway", 0))
  differ = jax.tree.map(np.array_equal,
                        restore_params(str(tmp_path / "oneway"), 20, 1),
                        restore_params(str(tmp_path / "alone"), 20, 1))
  assert not all(jax.tree.leaves(differ))


@pytest.mark.slow
def test_averaging_with_a_quorum_goes_on_without_a_dead_peer(tmp_path):
  config = codistill_config(**{
      "codistill.num_groups": 3, "codistill.method": "average",
      "codistill.exchange_every": 5, "codistill.burn_in_steps": 0,
      "codistill.averaging.quorum": 2, "codistill.averaging.grace_s": 0.2,
      "codistill.peer_timeout_s": 600.0, "total_steps": 10})
  t0 = time.time()
  # Group 2 never comes: without the quorum each average would wait 600 s.
  train.train_and_evaluate(config, str(tmp_path), groups=[0, 1])
  assert time.time() - t0 < 300
  for g in (0, 1):
    # From the first average (step 5) on, each averaged with its one peer.
    rows = [r for r in _rows(tmp_path, g) if r["step"] >= 5]
    assert rows and all(r["averaging/peers"] == 1 for r in rows), rows


def _start(args, workdir, log, devices=1):
  env = {**os.environ, "PYTHONPATH": ROOT,
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(
      [sys.executable, "-m", "codistill_jax.main", f"--config={HETERO}:quick",
       f"--workdir={workdir}", *args], env=env, cwd=ROOT,
      stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _wait_for(predicate, what, procs=(), timeout=600):
  t0 = time.time()
  while not predicate():
    assert time.time() - t0 < timeout, f"timed out waiting for {what}"
    for proc in procs:
      assert proc.poll() is None, f"{proc.args} exited {proc.returncode}"
    time.sleep(0.5)


@pytest.mark.slow
def test_a_group_joins_a_running_run_and_another_is_killed(tmp_path):
  shared = ["--config.total_steps=100000", "--config.log_every=10",
            "--config.eval_every=100000", "--config.checkpoint_every=100000",
            "--config.codistill.max_groups=3",
            "--config.codistill.join_init=peer",
            f"--config.codistill.exchange_dir={tmp_path / 'exchange'}"]
  first = _start([*shared, "--groups=0,1"], tmp_path / "first",
                 tmp_path / "first.log", devices=2)
  try:
    exchange_root = tmp_path / "exchange" / "runs"
    _wait_for(lambda: exchange_root.exists() and any(
        exchange.published_steps(paths.published_dir(str(
            exchange_root / r), 0)) for r in os.listdir(exchange_root)),
              "group 0 to publish", [first])
    run_dir = str(exchange_root / os.listdir(exchange_root)[0])
    # Group 2 joins: the wide model's architecture, from group 0's params.
    joiner = _start([*shared, "--groups=2"], tmp_path / "joiner",
                    tmp_path / "joiner.log")
    _wait_for(lambda: 2 in exchange.read_members(run_dir), "group 2 to join",
              [first, joiner])
    _wait_for(lambda: exchange.published_steps(
        paths.published_dir(run_dir, 2)), "group 2 to publish",
              [first, joiner])
    log = lambda name: open(tmp_path / name).read()
    _wait_for(lambda: "peer 2 joined the run" in log("first.log"),
              "groups 0 and 1 to meet group 2", [first, joiner])
    assert "joins from peer 0's params" in log("joiner.log")
    # The others' teacher counts change: peers 1 -> 2 in their metrics.
    _wait_for(lambda: any(r.get("peers") == 2 for r in _rows(
        tmp_path / "first", 1)), "group 1 to log 2 peers", [first])
    # Group 2 is killed: the others go on (no one waits for it).
    joiner.send_signal(signal.SIGKILL)
    joiner.wait()
    step_then = max(r["step"] for r in _rows(tmp_path / "first", 0))
    _wait_for(lambda: max(r["step"] for r in _rows(
        tmp_path / "first", 0)) > step_then + 50, "group 0 to go on",
              [first])
    assert first.poll() is None
  finally:
    first.send_signal(signal.SIGTERM)
    try:
      first.wait(timeout=120)
    except subprocess.TimeoutExpired:
      first.kill()
  members = exchange.read_members(run_dir)
  assert members[0]["status"] == "left" and members[2]["status"] == "running"
  assert members[2]["model_name"] == members[0]["model_name"]
  with open(tmp_path / "first.log") as f:
    assert "Traceback" not in f.read()


def test_compile_check_reports_each_group_of_a_heterogeneous_pair():
  from codistill_jax.tools import compile_check  # pylint: disable=g-import-not-at-top
  config = config_lib.load(f"{HETERO}:quick,devices=6+2")
  assert compile_check.distinct_groups(config) == [0, 1]
  wide, narrow = (compile_check.check(config, group=g) for g in (0, 1))
  assert (wide.devices_per_group, narrow.devices_per_group) == (6, 2)
  assert wide.params > narrow.params and wide.teachers == narrow.teachers == 1
  # Each holds the other's params as its teacher: the narrow group's
  # arguments hold the wide teacher, and the reverse.
  assert wide.argument_bytes > 4 * (wide.params + narrow.params)
  assert narrow.argument_bytes > 4 * (wide.params + narrow.params)

"""Codistillation end to end: groups on sub-meshes, processes, two-phase."""

import os
import re
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from codistill_jax.tools import churn
from codistill_jax import exchange
from codistill_jax import checkpoint
from codistill_jax import paths
from codistill_jax import metrics
from codistill_jax import train
from codistill_jax.errors import ConfigError
from tests.test_train import ROOT, assert_trees_equal, load_config
from tests.test_train import restore_params


def codistill_config(**overrides):
  config = load_config("flights")
  config.codistill.num_groups = 2
  config.codistill.exchange_every = 4
  config.codistill.burn_in_steps = 6
  # Publish and reload before going on: exact, reproducible staleness.
  config.codistill.exchange_blocking = True
  config.total_steps, config.log_every = 20, 1
  config.eval_every, config.checkpoint_every = 20, 10
  for k, v in overrides.items():
    node = config
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config


@pytest.mark.slow
def test_two_groups_on_sub_meshes_exchange_and_distil(tmp_path):
  config = codistill_config()
  final = train.train_and_evaluate(config, str(tmp_path))
  for g in (0, 1):
    rows = [r for r in metrics.read_jsonl(
        str(tmp_path / f"group_{g}" / "metrics.jsonl")) if "loss" in r]
    by_step = {r["step"]: r for r in rows}
    # Burn-in: alpha is 0 up to step 6 (the step counter before the update).
    assert all(by_step[s]["alpha"] == 0.0 for s in range(1, 7))
    # After it, alpha is 1 as soon as a peer's params are held: blocking
    # exchange reloads them at step 4, so from step 7 on.
    assert all(by_step[s]["alpha"] == 1.0 for s in range(7, 21))
    # Exchange cadence: the update from step t uses the peer's step of the
    # last exchange at or before t (a multiple of 4; staleness 0..3), never
    # one from the future. The row of step s logs the update from s - 1 (one
    # update a window here), and none before a teacher is held.
    peer = 1 - g
    held = {s: (s - 1) - r[f"staleness/group_{peer}"]
            for s, r in by_step.items() if f"staleness/group_{peer}" in r}
    assert held == {s: (s - 1) - (s - 1) % 4 for s in range(5, 21)}
    assert all(r[f"staleness_max/group_{peer}"] ==
               r[f"staleness/group_{peer}"] for r in rows
               if f"staleness/group_{peer}" in r)
    # Peer metrics only once a teacher is held (no placeholders before).
    assert all(("peer_abs_diff" in by_step[s]) == (s >= 5) for s in by_step)
    # Distillation is on and visible once a teacher arrived after burn-in.
    assert all(r["distill_loss"] > 0 for r in rows if r["alpha"] == 1.0)
    assert all(r[f"restore_failures/group_{peer}"] == 0 for r in rows
               if f"restore_failures/group_{peer}" in r)
    steps = exchange.published_steps(paths.published_dir(
        paths.run_dir(str(tmp_path), checkpoint.run_identity(config)), g))
    assert steps == [12, 16, 20]  # max_to_keep = 3.
  # Per-group, ensemble and agreement metrics at the end.
  assert "test/auc" in final[0] and "test/auc" in final[1]
  assert {"test/ensemble/auc", "test/churn/mean_abs_diff"} <= set(
      final["groups"])
  assert 0 < final["groups"]["test/churn/mean_abs_diff"] < 1


@pytest.mark.slow
def test_background_exchange_delivers_teachers(tmp_path):
  # The default, non-blocking exchange: when peers arrive depends on timing,
  # but over enough steps they do, and never from the future.
  config = codistill_config(**{"codistill.exchange_blocking": False})
  config.total_steps, config.log_every = 120, 5
  train.train_and_evaluate(config, str(tmp_path))
  for g in (0, 1):
    rows = [r for r in metrics.read_jsonl(
        str(tmp_path / f"group_{g}" / "metrics.jsonl")) if "loss" in r]
    key = f"teacher_step/group_{1 - g}"
    held = [(r["step"], r[key]) for r in rows if key in r]
    assert held, "the peer's params never arrived"
    assert all(h % 4 == 0 and 0 < h < s for s, h in held)
    assert rows[-1]["alpha"] == 1.0 and rows[-1]["distill_loss"] > 0


def test_groups_use_disjoint_devices_and_data():
  config = codistill_config()
  from codistill_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  module = data_lib.get_module("flights")
  seen = []
  for g in (0, 1):
    ds = module.get_datasets(config, group=g, num_groups=2, process_index=0,
                             process_count=1)
    it = ds.train(0)
    seen.append({int(i) for _ in range(20) for i in next(it)["index"]})
  assert not seen[0] & seen[1]
  from codistill_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  a, b = mesh_lib.group_devices(2)
  assert not set(a) & set(b) and len(a) == 4


@pytest.mark.slow
def test_one_group_ignores_codistill_settings_bitwise(tmp_path):
  base = load_config("flights")
  base.total_steps = 12
  train.train_and_evaluate(base, str(tmp_path / "base"))
  tweaked = load_config("flights")
  tweaked.total_steps = 12
  tweaked.codistill.alpha, tweaked.codistill.exchange_every = 0.7, 3
  tweaked.codistill.burn_in_steps = 0
  train.train_and_evaluate(tweaked, str(tmp_path / "g1"))
  assert_trees_equal(restore_params(str(tmp_path / "base"), 12),
                     restore_params(str(tmp_path / "g1"), 12))
  assert not (tmp_path / "g1" / "runs").exists()  # Nothing published.


@pytest.mark.slow
def test_two_phase_distillation_from_a_checkpoint_of_another_architecture(
    tmp_path):
  teacher = load_config("flights")
  teacher.model.hidden_sizes, teacher.total_steps = (24, 8), 10
  train.train_and_evaluate(teacher, str(tmp_path / "teacher"))

  student = load_config("flights")
  student.total_steps, student.log_every = 6, 1
  cd = student.codistill
  cd.teacher_source = "checkpoint"
  cd.teacher_checkpoint = str(tmp_path / "teacher")
  cd.teacher_model_name = "ctr_mlp"
  cd.teacher_model.unlock()
  cd.teacher_model.update(teacher.model.to_dict())
  cd.burn_in_steps, cd.teacher_dtype = 0, "bfloat16"
  train.train_and_evaluate(student, str(tmp_path / "student"))
  rows = [r for r in metrics.read_jsonl(
      str(tmp_path / "student" / "group_0" / "metrics.jsonl")) if "loss" in r]
  assert all(r["alpha"] == 1.0 and r["distill_loss"] > 0 for r in rows)

  # With no model named, the teacher run's own config.json says which
  # architecture it is: the run directory is enough.
  cd.teacher_model_name = ""
  cd.teacher_model = ml_collections.ConfigDict()
  train.train_and_evaluate(student, str(tmp_path / "student2"))
  # A bare step dir (no run around it) falls back to the student's
  # architecture, which is not the teacher's: refused.
  bare = str(tmp_path / "bare_step")
  shutil.copytree(str(tmp_path / "teacher" / "group_0" / "checkpoints" / "10"),
                  bare)
  cd.teacher_checkpoint = bare
  with pytest.raises(ConfigError, match="teacher_checkpoint.*architecture"):
    train.train_and_evaluate(student, str(tmp_path / "student3"))


@pytest.mark.parametrize("field,value,match", [
    ("codistill.exchange_every", 0, "exchange_every"),
    ("codistill.num_groups", 3, "num_groups"),
    ("codistill.divergence", "js", "divergence"),
    ("codistill.teacher_source", "checkpoint", "teacher_checkpoint"),
    ("codistill.temperature", 0.0, "temperature"),
])
def test_bad_codistill_config_writes_nothing(tmp_path, field, value, match):
  config = codistill_config(**{field: value})
  with pytest.raises(ConfigError, match=match):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_churn_between_runs(tmp_path):
  config = load_config("flights")
  config.total_steps = 10
  for seed in (0, 1):
    config.seed = seed
    train.train_and_evaluate(config, str(tmp_path / f"s{seed}"))
  params = [churn.restore_group_params(config, str(tmp_path / f"s{s}"), 0)
            for s in (0, 1)]
  same = churn.compare(config, [params[0], params[0]], "test")
  diff = churn.compare(config, params, "test")
  assert same["test/churn/mean_abs_diff"] == 0.0
  assert diff["test/churn/mean_abs_diff"] > 0.0
  assert same["test/ensemble/auc"] == pytest.approx(same["test/model_0/auc"])


# ---------------------------------------------------------------------------
# Separate processes and multi-process groups, through a real directory.
# ---------------------------------------------------------------------------
def launch(workdir, *args, timeout=500):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run(
      [sys.executable, "experiments/launch_local.py",
       "--config=configs/flights_codistill.py:quick", f"--workdir={workdir}",
       *args], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=timeout)


def _peer_steps_seen(workdir, g, peer):
  rows = metrics.read_jsonl(os.path.join(workdir, f"group_{g}",
                                         "metrics.jsonl"))
  return [r[f"teacher_step/group_{peer}"] for r in rows
          if f"teacher_step/group_{peer}" in r]


@pytest.mark.slow
def test_three_groups_as_three_processes(tmp_path):
  # Enough steps that the three runs overlap although they start seconds
  # apart (each quick step takes milliseconds).
  result = launch(str(tmp_path), "--config.codistill.num_groups=3",
                  "--progress_every=1",
                  "--config.total_steps=3000", "--config.log_every=50",
                  "--config.codistill.exchange_every=20",
                  "--config.eval_every=3000", "--config.checkpoint_every=3000")
  assert result.returncode == 0, result.stdout + result.stderr
  for g in range(3):
    for peer in set(range(3)) - {g}:
      assert _peer_steps_seen(str(tmp_path), g, peer), (g, peer)
  # The launcher's report: progress lines, a table of each group's final
  # metrics, where things are, and that it finished.
  out = result.stdout
  assert re.search(r"group 1: step \d+/3000  loss \d", out), out
  table = out[out.index("final metrics"):]
  for g in range(3):
    assert re.search(rf"group {g} +\d\.\d{{4}}", table), table
  assert "test/auc" in table and "validation/log_loss" in table
  assert f"tensorboard --logdir={tmp_path}" in out
  assert out.strip().endswith("finished: 3000 steps in every group")


@pytest.mark.slow
def test_a_failing_group_is_reported_with_its_error_and_exit_code(tmp_path):
  # Passes the launcher's own checks (one device), fails in the children:
  # their 3 devices do not divide the batch of 64.
  result = launch(str(tmp_path), "--devices_per_process=3")
  assert result.returncode == 2, result.stdout + result.stderr
  assert re.search(r"group_0.proc_0.log failed \(exit 2\): error: config"
                   r"\.data\.batch_size=64 is not divisible by the 3 devices",
                   result.stdout), result.stdout
  assert "failed: see " in result.stdout


@pytest.mark.slow
def test_group_as_two_process_jax_job(tmp_path):
  result = launch(str(tmp_path), "--processes_per_group=2",
                  "--config.total_steps=400", "--config.log_every=20",
                  "--config.codistill.exchange_every=20",
                  "--config.codistill.burn_in_steps=0",
                  "--config.eval_every=400", "--config.checkpoint_every=400")
  logs = {f: open(tmp_path / "logs" / f).read()
          for f in os.listdir(tmp_path / "logs")}
  assert result.returncode == 0, result.stdout + "\n".join(
      l[-3000:] for l in logs.values())
  assert len(logs) == 4  # 2 groups x 2 processes.
  # Each group is one job over both processes' devices: 2 devices a group.
  assert "group 0: 2 devices" in logs["group_0.proc_0.log"]
  for g in (0, 1):
    assert _peer_steps_seen(str(tmp_path), g, 1 - g)
  # Both processes of a group computed the same (replicated) result.
  params = [restore_params(str(tmp_path), 400, g) for g in (0, 1)]
  assert not np.allclose(jax.tree.leaves(params[0])[0],
                         jax.tree.leaves(params[1])[0])


@pytest.mark.slow
def test_ctrl_c_to_the_launcher_saves_every_group_and_rerun_resumes(tmp_path):
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  args = [sys.executable, "experiments/launch_local.py",
          "--config=configs/flights_codistill.py:quick",
          f"--workdir={tmp_path}", "--config.total_steps=20000",
          "--config.log_every=10", "--config.checkpoint_every=100000"]
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  logs = [tmp_path / f"group_{g}" / "metrics.jsonl" for g in (0, 1)]
  deadline = time.time() + 240
  while time.time() < deadline and not all(
      p.exists() and metrics.read_jsonl(str(p)) for p in logs):
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=240)
  # Stopped early, every group saved: the launcher's "resumable" code.
  assert proc.returncode == 75, out
  assert "rerun the same command to resume" in out
  for g in (0, 1):
    steps = [int(d) for d in os.listdir(tmp_path / f"group_{g}" / "checkpoints")
             if d.isdigit()]
    assert steps and max(steps) < 20000, (g, steps)
  # The same command resumes each group from its own checkpoint.
  lines = [len(metrics.read_jsonl(str(p))) for p in logs]
  rerun = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  # Stop it once both groups logged again, i.e. are inside the loop (a
  # SIGTERM during start-up, before the handler exists, just kills).
  deadline = time.time() + 240
  while time.time() < deadline and not all(
      len(metrics.read_jsonl(str(p))) > n for p, n in zip(logs, lines)):
    time.sleep(0.2)
  rerun.send_signal(signal.SIGTERM)
  out, _ = rerun.communicate(timeout=240)
  assert rerun.returncode == 75, out
  for f in ("group_0.proc_0.log", "group_1.proc_0.log"):
    assert "resumed from its own checkpoint" in (tmp_path / "logs" / f
                                                 ).read_text()

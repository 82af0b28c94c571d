"""Recipes for more than one machine, run small on this one.

  * A group as a multi-process JAX job started by SLURM (`srun ... main.py
    --coordinator_address=auto`): the SLURM environment of two tasks is
    written by hand, so jax.distributed sets itself up exactly as under srun.
  * G separate jobs that share nothing but an exchange directory (as on NFS
    or gs://): their own workdirs, `config.codistill.exchange_dir` in common.
  * One multi-host JAX job holding G sub-meshes: two processes of two
    devices each, every group on one device of each process; preempted by
    SIGTERM and resumed, it ends bitwise where the same run in one process
    of four devices ends; and with the default background exchange it runs
    without any job-wide collective meeting the groups' all-reduces.
  * A job whose groups would each live on a subset of its processes: a clear
    error (orbax-checkpoint cannot save such groups; see mesh.group_devices).
  * experiments/sweep_launch.py: the dry run of every config and launcher,
    and one of its commands run for real.
"""

import glob
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from codistill_jax import config_lib
from codistill_jax import metrics
from tests.test_train import ROOT, assert_trees_equal, restore_params

pytestmark = pytest.mark.slow

QUICK = "--config=configs/flights_codistill.py:quick"


def env_for(devices=1, **extra):
  env = {k: v for k, v in os.environ.items()
         if k != "XLA_FLAGS" and not k.startswith("SLURM_")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             **{k: str(v) for k, v in extra.items()})
  return env


def slurm_task(task, ntasks, job_id, *args, log):
  """One task of an `srun --ntasks=N` step on this host."""
  env = env_for(SLURM_JOB_ID=job_id, SLURM_STEP_NODELIST="localhost",
                SLURM_NTASKS=ntasks, SLURM_PROCID=task, SLURM_LOCALID=task,
                SLURM_STEP_NUM_NODES=1)
  return subprocess.Popen(
      [sys.executable, "-m", "codistill_jax.main", QUICK,
       "--coordinator_address=auto", *args], cwd=ROOT, env=env,
      stdout=open(log, "w"), stderr=subprocess.STDOUT)


def peer_steps(workdir, g, peer):
  path = os.path.join(workdir, f"group_{g}", "metrics.jsonl")
  rows = metrics.read_jsonl(path) if os.path.exists(path) else []
  key = f"teacher_step/group_{peer}"
  return [r[key] for r in rows if key in r]


def test_slurm_multi_process_group_and_a_separate_job_share_an_exchange_dir(
    tmp_path):
  shared = str(tmp_path / "nfs_exchange")
  common = ["--config.total_steps=600", "--config.log_every=20",
            "--config.eval_every=600", "--config.checkpoint_every=600",
            "--config.codistill.exchange_every=20",
            "--config.codistill.burn_in_steps=0",
            # Group 1 starts late and is 5x faster: let it run free.
            "--config.codistill.max_staleness=0",
            f"--config.codistill.exchange_dir={shared}"]
  run0, run1 = str(tmp_path / "job0"), str(tmp_path / "job1")
  # Group 0: a 2-task SLURM step (one JAX job, one device per process).
  tasks = [slurm_task(t, 2, 20 + os.getpid() % 1000,
                      f"--workdir={run0}", "--groups=0", *common,
                      log=tmp_path / f"g0_task{t}.log") for t in (0, 1)]
  # Group 1: an ordinary single-process job with its own workdir, started
  # once group 0 trains (its two-process steps are ~5x slower on this host;
  # started together, group 1 would be done before group 0 published).
  first_row = os.path.join(run0, "group_0", "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(first_row) and metrics.read_jsonl(first_row)):
    assert time.time() < deadline and all(p.poll() is None for p in tasks)
    time.sleep(0.1)
  job1 = subprocess.Popen(
      [sys.executable, "-m", "codistill_jax.main", QUICK,
       f"--workdir={run1}", "--groups=1", *common], cwd=ROOT, env=env_for(),
      stdout=open(tmp_path / "g1.log", "w"), stderr=subprocess.STDOUT)
  codes = [p.wait(timeout=400) for p in tasks + [job1]]
  logs = {p.name: p.read_text()[-3000:] for p in tmp_path.glob("*.log")}
  assert codes == [0, 0, 0], (codes, logs)
  log0 = (tmp_path / "g0_task0.log").read_text()
  assert "group 0: 2 devices" in log0  # One job over both SLURM tasks.
  # Each job has its own checkpoints; they met only in the shared dir.
  assert os.listdir(os.path.join(run0, "group_0", "checkpoints")) == ["600"]
  assert os.listdir(os.path.join(run1, "group_1", "checkpoints")) == ["600"]
  (run,) = os.listdir(os.path.join(shared, "runs"))  # One run, both groups.
  assert sorted(os.listdir(os.path.join(shared, "runs", run))) == [
      "group_0", "group_1", "run.json"]
  assert peer_steps(run0, 0, 1) and peer_steps(run1, 1, 0)


def test_one_multi_host_job_holds_both_groups_preempted_and_resumed(
    tmp_path):
  total = 40
  flags = [QUICK, f"--config.total_steps={total}", "--config.log_every=1",
           "--config.eval_every=1000", "--config.checkpoint_every=1000",
           "--config.codistill.exchange_every=5",
           "--config.codistill.burn_in_steps=5",
           # Deterministic: each exchange publishes and reloads before the
           # next step, so two layouts of one run can be compared bitwise.
           "--config.codistill.exchange_blocking=True"]
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  reference = subprocess.Popen(
      [sys.executable, "-m", "codistill_jax.main", f"--workdir={single}",
       *flags], cwd=ROOT, env=env_for(devices=4),
      stdout=open(tmp_path / "single.log", "w"), stderr=subprocess.STDOUT)

  def job(attempt):
    port = 20000 + (os.getpid() * 7 + attempt) % 20000
    return [subprocess.Popen(
        [sys.executable, "-m", "codistill_jax.main", f"--workdir={multi}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={p}", *flags], cwd=ROOT, env=env_for(devices=2),
        stdout=open(tmp_path / f"multi{attempt}_p{p}.log", "w"),
        stderr=subprocess.STDOUT) for p in (0, 1)]

  def log(name):
    return (tmp_path / name).read_text()

  procs = job(0)
  # Preempted mid-run: SIGTERM to every process (as a scheduler does).
  deadline = time.time() + 300
  while max(peer_steps(multi, 0, 1) or [0]) < 10:
    assert time.time() < deadline and all(p.poll() is None for p in procs), (
        log("multi0_p0.log")[-3000:])
    time.sleep(0.2)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  assert [p.wait(timeout=300) for p in procs] == [0, 0], log("multi0_p0.log")
  stops = {int(m) for p in (0, 1) for m in re.findall(
      r"stopped at step (\d+) after SIGTERM", log(f"multi0_p{p}.log"))}
  assert len(stops) == 1, stops  # Both processes stopped at the same step.
  stop = stops.pop()
  assert 10 <= stop < total
  for g in (0, 1):
    assert os.listdir(os.path.join(multi, f"group_{g}", "checkpoints")) == [
        str(stop)]

  procs = job(1)
  assert [p.wait(timeout=300) for p in procs] == [0, 0], log("multi1_p0.log")
  assert reference.wait(timeout=300) == 0, log("single.log")
  text = log("multi1_p0.log")
  for g in (0, 1):
    # One job, both groups, each on one device of each process.
    assert f"group {g}: 2 devices" in text
    assert f"group {g}: resumed from its own checkpoint at step {stop}" in text
    # Each read its peer's publications through the exchange directory.
    assert peer_steps(multi, g, 1 - g)
    assert_trees_equal(restore_params(multi, total, g),
                       restore_params(single, total, g))
  # The ensemble of the job's groups was evaluated, as in one process.
  assert os.path.exists(os.path.join(multi, "ensemble", "metrics.jsonl"))


def test_one_multi_host_job_with_the_background_exchange(tmp_path):
  # The default exchange: publishes and refreshes overlap the groups' train
  # steps, so any job-wide collective would meet their all-reduces (gloo
  # aborts with "collective mismatch"); only per-group ones may run.
  workdir = str(tmp_path / "run")
  port = 20000 + (os.getpid() * 11) % 20000
  procs = [subprocess.Popen(
      [sys.executable, "-m", "codistill_jax.main", QUICK,
       f"--workdir={workdir}", "--config.total_steps=150",
       "--config.log_every=5", "--config.codistill.exchange_every=5",
       "--config.codistill.burn_in_steps=0", "--config.checkpoint_every=25",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={p}"], cwd=ROOT, env=env_for(devices=2),
      stdout=open(tmp_path / f"p{p}.log", "w"), stderr=subprocess.STDOUT)
      for p in (0, 1)]
  codes = [p.wait(timeout=400) for p in procs]
  assert codes == [0, 0], (tmp_path / "p0.log").read_text()[-3000:]
  for g in (0, 1):
    assert len(set(peer_steps(workdir, g, 1 - g))) > 3  # Fresh teachers.
    assert "150" in os.listdir(os.path.join(workdir, f"group_{g}",
                                            "checkpoints"))


def test_groups_split_over_the_processes_of_one_job_is_a_clear_error(
    tmp_path):
  logs = [tmp_path / f"task{t}.log" for t in (0, 1)]
  tasks = [slurm_task(t, 2, 30 + os.getpid() % 1000,
                      f"--workdir={tmp_path / 'run'}", log=logs[t])
           for t in (0, 1)]
  assert [p.wait(timeout=300) for p in tasks] == [2, 2]
  for log in logs:
    errors = [l for l in log.read_text().splitlines()
              if l.startswith("error:")]
    assert len(errors) == 1 and "run each group as its own job" in errors[0]
  assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------
# experiments/sweep_launch.py
# ---------------------------------------------------------------------------
def sweep(*args):
  return subprocess.run(
      [sys.executable, "experiments/sweep_launch.py", *args], cwd=ROOT,
      env=env_for(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("launcher", ["shell", "slurm", "gcloud_tpu"])
def test_sweep_dry_run_prints_one_command_per_point_and_group(tmp_path,
                                                              launcher):
  result = sweep("--config=configs/flights_codistill.py",
                 f"--workdir_root={tmp_path}", f"--launcher={launcher}",
                 "--nodes_per_group=2", "--dry_run")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 3 * 2  # sweep(): 3 seeds; 2 groups each.
  for i, line in enumerate(lines):
    words = shlex.split(line)  # Every line is valid shell.
    text = " ".join(words)
    assert f"--groups={i % 2}" in text and f"--config.seed={i // 2}" in text
    assert f"--workdir={tmp_path}/p{i // 2}_seed={i // 2}" in text
    assert {"shell": "nohup", "slurm": "sbatch",
            "gcloud_tpu": "gcloud"}[launcher] in words
  assert not os.listdir(tmp_path)  # A dry run starts and writes nothing.


def test_sweep_dry_run_one_job_per_point_holding_all_groups(tmp_path):
  result = sweep("--config=configs/flights_codistill.py",
                 f"--workdir_root={tmp_path}", "--launcher=slurm",
                 "--nodes_per_group=2", "--one_job", "--dry_run")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 3  # sweep(): 3 seeds, each one job of both groups.
  for i, line in enumerate(lines):
    text = " ".join(shlex.split(line))
    assert "--groups" not in text and f"--config.seed={i}" in text
    assert "--nodes=2" in text and "--coordinator_address=auto" in text
  assert not os.listdir(tmp_path)


def test_sweep_of_every_config_validates_its_commands(tmp_path):
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    name = os.path.relpath(path, ROOT)
    # Validation reads the data's location: skip it where the Debian
    # packages of the data are not installed.
    data = {"kernel_lm": "/usr/share/doc/linux-doc-6.1",
            "fashion_mnist": "/usr/share/datasets/fashion-mnist"}
    missing = any(k in name and not os.path.isdir(v) for k, v in data.items())
    result = sweep(f"--config={name}:quick", f"--workdir_root={tmp_path}",
                   "--dry_run", "--novalidate" if missing else "--validate")
    assert result.returncode == 0, (name, result.stderr)
    assert result.stdout.count("codistill_jax.main") >= 1, name
  # A typo in an extra flag fails before anything is printed or started.
  bad = sweep("--config=configs/flights.py:quick",
              f"--workdir_root={tmp_path}", "--dry_run",
              "--extra=--config.totl_steps=3")
  assert bad.returncode == 2 and not bad.stdout
  assert "totl_steps" in bad.stderr and "Traceback" not in bad.stderr


def test_a_printed_sweep_command_runs(tmp_path):
  result = sweep("--config=configs/flights.py:quick",
                 f"--workdir_root={tmp_path}", "--dry_run",
                 "--extra=--config.total_steps=3",
                 f"--python={sys.executable}")
  assert result.returncode == 0, result.stderr
  first = result.stdout.splitlines()[0]
  assert first.endswith(" &")  # In the background, as the shell launcher does.
  run = subprocess.run(first[:-2], shell=True, cwd=ROOT,
                       env=env_for(), capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr
  workdir = os.path.join(str(tmp_path), "p0_seed=0")
  assert os.listdir(os.path.join(workdir, "group_0", "checkpoints")) == ["3"]


def test_named_sweep_launches_each_points_own_group_count(tmp_path):
  points = config_lib.load_module(config_lib.config_path("flights")).sweep(
      "churn")
  want = sum(p.get("codistill.num_groups", 1) for p in points)
  result = sweep("--config=configs/flights.py:quick", "--sweep=churn",
                 f"--workdir_root={tmp_path}", "--dry_run")
  assert result.returncode == 0, result.stderr
  assert len(result.stdout.splitlines()) == want > len(points)

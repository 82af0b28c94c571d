"""Every command refuses bad input the same way: one table, run as commands.

Each case runs a command (`python -m codistill_jax.tools.X`, or one of the
launchers in experiments/) as a subprocess on inputs a user can get wrong
-- a missing flag, a path that does not exist or is a file where a directory
is needed (and the reverse), a directory that is no run, a damaged
config.json or metrics line, a number out of range, a group the run does not
have, an output that exists or cannot be created -- and must end with exit
code 2, exactly one `error:` line on stderr that names the flag or file (the
case's words), no traceback, and nothing written: the case's directory is
the same, file for file and directory for directory, before and after.

The quick cases need no trained run (fake runs: a config.json and metrics
lines) and run a few at a time in a module fixture; most end before JAX is
imported. The slow ones need a real checkpoint (`files` of
tests/test_bad_input.py, whose CASES are the trainer's own matrix). Then the
launcher's exit code: bad input is 2, never 75 (75 tells a scheduler to rerun
it), and a launcher stopped before any group saved is not 75 either.
"""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from codistill_jax import config_lib
from codistill_jax import paths
from tests import test_bad_input
from tests.test_bad_input import assert_one_error_line
from tests.test_bad_input import cli
from tests.test_bad_input import FLIGHTS
from tests.test_bad_input import snapshot
from tests.test_train import ROOT

# The trainer matrix's trained runs (a fixture), for the slow cases.
files = test_bad_input.files

CHURN = "codistill_jax.tools.churn"
NOISE = "codistill_jax.tools.noise_scale"
STORE = "codistill_jax.tools.store_targets"
COMPILE = "codistill_jax.tools.compile_check"
SERVE = "codistill_jax.tools.serve"
CORPUS = "codistill_jax.tools.corpus"
LAUNCH = "experiments/launch_local.py"
SWEEP = "experiments/sweep_launch.py"
CODISTILL = "configs/flights_codistill.py:quick"

# (id, command, args, words the error line must contain). '{x}' is a path of
# `fake_inputs` in the case's own directory.
QUICK = [
    # churn: two runs, a group of each, a split, an output file.
    ("churn_no_run_b", CHURN, ["--run_a={run}"], ["--run_b is required"]),
    ("churn_run_missing", CHURN, ["--run_a={root}/nope", "--run_b={run}"],
     ["--run_a=", "no such run directory"]),
    ("churn_run_is_a_file", CHURN, ["--run_a={a_file}", "--run_b={run}"],
     ["--run_a=", "is a file"]),
    ("churn_not_a_run", CHURN, ["--run_a={run}", "--run_b={empty_dir}"],
     ["--run_b=", "not a codistill_jax run directory"]),
    ("churn_config_json_damaged", CHURN,
     ["--run_a={damaged_config}", "--run_b={run}"],
     ["--run_a=", "config.json", "damaged"]),
    ("churn_group_beyond_the_run", CHURN,
     ["--run_a={run}", "--run_b={run}", "--group_b=1"],
     ["--group_b=1", "only group 0"]),
    ("churn_group_negative", CHURN,
     ["--run_a={run}", "--run_b={run}", "--group_a=-1"], ["--group_a=-1"]),
    ("churn_other_architecture", CHURN, ["--run_a={run}", "--run_b={other}"],
     ["--run_a and --run_b", "different architectures"]),
    ("churn_out_is_a_directory", CHURN,
     ["--run_a={run}", "--run_b={run}", "--out={empty_dir}"],
     ["--out=", "is a directory"]),
    ("churn_out_under_a_file", CHURN,
     ["--run_a={run}", "--run_b={run}", "--out={a_file}/churn.json"],
     ["--out=", "is a file"]),
    ("churn_no_checkpoint", CHURN, ["--run_a={run}", "--run_b={run}"],
     ["--run_a", "no committed checkpoint"]),
    # noise_scale: a run (or a config to train), a group, the report file.
    ("noise_no_workdir", NOISE, [], ["--workdir is required"]),
    ("noise_workdir_missing", NOISE, ["--workdir={root}/nope"],
     ["--workdir=", "no such run directory"]),
    ("noise_workdir_is_a_file", NOISE, ["--workdir={a_file}"],
     ["--workdir=", "is a file"]),
    ("noise_not_a_run", NOISE, ["--workdir={empty_dir}"],
     ["--workdir=", "not a codistill_jax run directory"]),
    ("noise_config_json_damaged", NOISE, ["--workdir={damaged_config}"],
     ["--workdir=", "config.json", "damaged"]),
    ("noise_group_beyond_the_run", NOISE, ["--workdir={run}", "--group=1"],
     ["--group=1", "only group 0"]),
    ("noise_group_beyond_the_config", NOISE,
     [f"--config={FLIGHTS}", "--workdir={root}/new", "--group=2"],
     ["--group=2", "--config"]),
    ("noise_every_without_config", NOISE, ["--workdir={run}", "--every=5"],
     ["--every", "--config"]),
    ("noise_every_negative", NOISE,
     [f"--config={FLIGHTS}", "--workdir={root}/new", "--every=-1"],
     ["--every=-1"]),
    ("noise_report_is_a_directory", NOISE, ["--workdir={report_taken}"],
     ["noise_scale_group_0.json", "is a directory"]),
    ("noise_metrics_line_cut", NOISE, ["--workdir={torn_metrics}"],
     ["metrics.jsonl:1 is not a JSON line"]),
    ("noise_none_logged", NOISE, ["--workdir={run}"],
     ["--workdir=", "noise_scale.every"]),
    # store_targets: a new store directory, a teacher checkpoint.
    ("store_no_out", STORE, [f"--config={FLIGHTS}", "--teacher={run}"],
     ["--out is required"]),
    ("store_out_exists", STORE,
     [f"--config={FLIGHTS}", "--teacher={run}", "--out={empty_dir}"],
     ["--out=", "exists"]),
    ("store_out_under_a_file", STORE,
     [f"--config={FLIGHTS}", "--teacher={run}", "--out={a_file}/store"],
     ["--out=", "is a file"]),
    ("store_teacher_missing", STORE,
     [f"--config={FLIGHTS}", "--teacher={root}/nope", "--out={root}/store"],
     ["--teacher=", "no such"]),
    ("store_teacher_is_a_file", STORE,
     [f"--config={FLIGHTS}", "--teacher={a_file}", "--out={root}/store"],
     ["--teacher=", "is a file"]),
    ("store_teacher_without_checkpoint", STORE,
     [f"--config={FLIGHTS}", "--teacher={run}", "--out={root}/store"],
     ["--teacher=", "no committed checkpoint"]),
    # compile_check: the target and where the report goes.
    ("compile_no_devices", COMPILE, [f"--config={FLIGHTS}", "--num_devices=0"],
     ["--num_devices=0"]),
    ("compile_json_out_under_a_file", COMPILE,
     [f"--config={FLIGHTS}", "--json_out={a_file}/report.json"],
     ["--json_out=", "is a file"]),
    # serve: a running cluster to add workers to.
    ("serve_no_address", SERVE,
     [f"--config={FLIGHTS}", "--config.codistill.teacher_checkpoint={run}"],
     ["config.codistill.service.address"]),
    ("serve_nobody_at_the_address", SERVE,
     [f"--config={FLIGHTS}", "--config.codistill.teacher_checkpoint={run}",
      "--config.codistill.service.address=127.0.0.1:1"],
     ["config.codistill.service.address=127.0.0.1:1", "no Ray cluster"]),
    # corpus: source names.
    ("corpus_unknown_source", CORPUS, ["kernel_docs", "nope"],
     ["unknown source 'nope'", "known: kernel_docs"]),
    ("corpus_source_twice", CORPUS, ["gcide", "gcide"],
     ["'gcide' named twice"]),
    ("corpus_unknown_flag", CORPUS, ["--sources=gcide"], ["sources"]),
    # The launcher: its own flags, then the config and the workdir. Before
    # these checks it exited 75 ('rerun to resume') having started nothing.
    ("launch_no_processes", LAUNCH,
     [f"--config={CODISTILL}", "--workdir={root}/w", "--processes_per_group=0"],
     ["--processes_per_group=0"]),
    ("launch_no_devices", LAUNCH,
     [f"--config={CODISTILL}", "--workdir={root}/w", "--devices_per_process=0"],
     ["--devices_per_process=0"]),
    ("launch_group_beyond_the_config", LAUNCH,
     [f"--config={CODISTILL}", "--workdir={root}/w", "--groups=2"],
     ["--groups=2", "groups 0..1"]),
    ("launch_group_twice", LAUNCH,
     [f"--config={CODISTILL}", "--workdir={root}/w", "--groups=1,1"],
     ["--groups=1,1", "twice"]),
    ("launch_platform_unknown", LAUNCH,
     [f"--config={CODISTILL}", "--workdir={root}/w", "--platform=cpus"],
     ["--platform=cpus"]),
    ("launch_progress_negative", LAUNCH,
     [f"--config={CODISTILL}", "--workdir={root}/w", "--progress_every=-1"],
     ["--progress_every=-1"]),
    ("launch_typo", LAUNCH,
     [f"--config={FLIGHTS}", "--workdir={root}/w", "--config.totl_steps=3"],
     ["unknown config field 'totl_steps'"]),
    ("launch_bad_value", LAUNCH,
     [f"--config={FLIGHTS}", "--workdir={root}/w",
      "--config.optimizer.b1=2.0"], ["config.optimizer.b1=2.0 must be"]),
    ("launch_workdir_of_another_config", LAUNCH,
     [f"--config={CODISTILL}", "--workdir={run}"],
     ["--workdir=", "another config"]),
    ("launch_logs_is_a_file", LAUNCH,
     [f"--config={CODISTILL}", "--workdir={logs_taken}"],
     ["logs", "is a file"]),
    # The sweep launcher: the config's sweep, its own flags, and for the
    # shell launcher the paths it writes and runs.
    ("sweep_no_workdir_root", SWEEP, [f"--config={FLIGHTS}", "--dry_run"],
     ["--workdir_root is required"]),
    ("sweep_config_missing", SWEEP,
     ["--config=configs/nope.py", "--workdir_root={root}/s", "--dry_run"],
     ["configs/nope.py"]),
    ("sweep_unknown_sweep", SWEEP,
     [f"--config={FLIGHTS}", "--workdir_root={root}/s", "--sweep=nope",
      "--dry_run"], ["--sweep=nope"]),
    ("sweep_root_is_a_file", SWEEP,
     [f"--config={FLIGHTS}", "--workdir_root={a_file}", "--dry_run"],
     ["--workdir_root=", "is a file"]),
    ("sweep_extra_not_a_flag", SWEEP,
     [f"--config={FLIGHTS}", "--workdir_root={root}/s", "--dry_run",
      "--extra=config.total_steps=3"], ["--extra=config.total_steps=3"]),
    ("sweep_extra_sets_the_workdir", SWEEP,
     [f"--config={FLIGHTS}", "--workdir_root={root}/s", "--dry_run",
      "--extra=--workdir=/tmp/x"], ["--extra=--workdir=/tmp/x"]),
    ("sweep_no_nodes", SWEEP,
     [f"--config={FLIGHTS}", "--workdir_root={root}/s", "--launcher=slurm",
      "--nodes_per_group=0", "--dry_run"], ["--nodes_per_group=0"]),
    ("sweep_positional", SWEEP,
     [f"--config={FLIGHTS}", "--workdir_root={root}/s", "--dry_run", "seed=1"],
     ["unexpected arguments"]),
    ("sweep_python_missing", SWEEP,
     [f"--config={FLIGHTS}", "--workdir_root={root}/s",
      "--python={root}/no_python"], ["--python="]),
    ("sweep_point_workdir_of_another_config", SWEEP,
     [f"--config={FLIGHTS}", "--workdir_root={sweep_root}",
      "--python={fake_python}"],
     ["sweep point p0_seed=0", "another config"]),
]


# Cases that need a real checkpoint (tests/test_bad_input.py's `files`).
SLOW = [
    ("churn_corrupt_checkpoint", CHURN,
     ["--run_a={corrupt_run}", "--run_b={corrupt_run}"],
     ["--run_a", "unreadable or corrupt"]),
    ("churn_split_unknown", CHURN,
     ["--run_a={other_arch_run}", "--run_b={other_arch_run}",
      "--split=train"], ["--split=train", "validation"]),
    ("store_teacher_corrupt", STORE,
     [f"--config={FLIGHTS}", "--teacher={truncated_run}",
      "--out={empty_dir}/store"], ["--teacher=", "unreadable or corrupt"]),
]


def _write_run(workdir, config, rows=({"step": 1, "loss": 1.0},)):
  """A run directory as far as the commands' checks read one: config.json
  and group 0's metrics (no checkpoint)."""
  os.makedirs(paths.group_dir(workdir, 0))
  with open(paths.config_file(workdir), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(paths.metrics_file(workdir, 0), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def fake_inputs(root: str) -> dict[str, str]:
  """The paths the cases name, made under `root`."""
  out = {"root": root, "empty_dir": os.path.join(root, "empty"),
         "a_file": os.path.join(root, "a_file")}
  os.makedirs(out["empty_dir"])
  with open(out["a_file"], "w") as f:
    f.write("not a directory\n")
  config = config_lib.load(FLIGHTS, lock=False)
  for name in ("run", "damaged_config", "torn_metrics", "report_taken"):
    out[name] = os.path.join(root, name)
    _write_run(out[name], config)
  with open(paths.config_file(out["damaged_config"]), "w") as f:
    f.write('{"seed": 0, "mod')
  with open(paths.metrics_file(out["torn_metrics"], 0), "w") as f:
    f.write('{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n')
  os.makedirs(os.path.join(out["report_taken"], "noise_scale_group_0.json"))
  config.model.hidden_sizes = (7,)
  out["other"] = os.path.join(root, "other")
  _write_run(out["other"], config)
  out["logs_taken"] = os.path.join(root, "logs_taken")
  os.makedirs(out["logs_taken"])
  with open(paths.logs_dir(out["logs_taken"]), "w") as f:
    f.write("not a directory\n")
  # A sweep root whose first point's workdir holds a run of another config,
  # and a 'Python' that does nothing (should the check fail, no job runs).
  out["sweep_root"] = os.path.join(root, "sweep")
  _write_run(os.path.join(out["sweep_root"], "p0_seed=0"), config)
  out["fake_python"] = os.path.join(root, "fake_python")
  with open(out["fake_python"], "w") as f:
    f.write("#!/bin/sh\nexit 0\n")
  os.chmod(out["fake_python"], 0o755)
  return out


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
  """Runs every quick case, three at a time, each in its own directory;
  {id: (result, words, snapshot before, snapshot after)}."""
  base = tmp_path_factory.mktemp("commands")

  def one(case):
    name, command, args, words = case
    root = str(base / name)
    inputs = fake_inputs(root)
    before = snapshot(root)
    result = cli(*[a.format(**inputs) for a in args], module=command)
    return name, (result, words, before, snapshot(root))

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    return dict(pool.map(one, QUICK))


@pytest.mark.slow  # Subprocesses: the quick subset runs no CLI.
@pytest.mark.parametrize("name", [c[0] for c in QUICK])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(quick_results, name):
  result, words, before, after = quick_results[name]
  assert_one_error_line(result, words)
  assert after == before


def test_the_table_covers_every_command():
  commands = {c[1] for c in QUICK + SLOW}
  assert commands == {CHURN, NOISE, STORE, COMPILE, SERVE, CORPUS, LAUNCH,
                      SWEEP}
  names = [c[0] for c in QUICK + SLOW]
  assert len(names) == len(set(names))


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=[c[0] for c in SLOW])
def test_bad_input_on_trained_runs(files, case):
  _, command, args, words = case
  before = {k: snapshot(v) for k, v in files.items() if os.path.isdir(v)}
  result = cli(*[a.format(**files) for a in args], module=command)
  assert_one_error_line(result, words)
  assert {k: snapshot(v) for k, v in files.items()
          if os.path.isdir(v)} == before


# ---------------------------------------------------------------------------
# The launcher's exit code: 75 only when a group saved and a rerun resumes.
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_launcher_stopped_before_any_group_saved_is_not_resumable(
    tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen(
      [sys.executable, LAUNCH, f"--config={CODISTILL}",
       f"--workdir={tmp_path}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  first = proc.stdout.readline()  # Its first group is starting.
  assert first.startswith("started group_0"), first + proc.stderr.read()
  time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  out = first + out
  assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, out, err)
  assert "before any group saved a checkpoint: nothing to resume" in out
  assert "rerun the same command to resume" not in out
  assert "Traceback" not in err, err
  assert not os.path.exists(paths.checkpoints_dir(str(tmp_path), 0))

r"""Starts every group of a codistillation run as its own process(es) here.

Each group is an independent JAX job (`python -m codistill_jax.main
--groups=g`) on its own device(s); groups share only the workdir, where they
publish and reload parameters. With `--processes_per_group=2` each group is
itself a two-process JAX job (jax.distributed over localhost; gloo on CPU),
i.e. the multi-host code path run for real.

  python experiments/launch_local.py --config=configs/flights_codistill.py \
      --workdir=/tmp/codistill [--config.codistill.num_groups=3] \
      [--processes_per_group=2] [--devices_per_process=1] [--platform=cpu]

While the groups train it prints one line per group every `--progress_every`
seconds (step, loss, steps/s); at the end, each group's final metrics, where
the logs and TensorBoard events are, and one of these exit codes:

  0   every group finished its config.total_steps
  75  stopped early (SIGTERM or Ctrl-C to the launcher, a preemption): every
      group saved a checkpoint; rerun the same command to resume
  2   bad input (one `error:` line, as from codistill_jax.main)
  other  a group failed: its exit code, with its error line and log path

The config is validated here before anything starts, so a typo is the same
one line as through `codistill_jax.main`. SIGTERM or SIGINT to the launcher
becomes SIGTERM to every process (each saves a checkpoint and exits), and
the processes die with the launcher however it ends (Linux: the kernel sends
them SIGTERM when it exits, even on SIGKILL). Logs go to
WORKDIR/logs/group_<g>.proc_<p>.log.
"""

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

from absl import flags

# The checkout this script is in, before any installed copy of the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from codistill_jax import checkpoint as ckpt_lib
from codistill_jax import cli
from codistill_jax import metrics as metrics_lib
from codistill_jax import paths
from codistill_jax import validate
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Shared workdir.")
_PROCS = flags.DEFINE_integer("processes_per_group", 1,
                              "Processes per group (a multi-process JAX job).")
_DEVICES = flags.DEFINE_integer("devices_per_process", 1,
                                "CPU devices per process (CPU platform).")
_PLATFORM = flags.DEFINE_string(
    "platform", None, "JAX_PLATFORMS for the children, e.g. 'cpu'; default: "
    "the launcher's own JAX_PLATFORMS, else whatever JAX finds.")
_GROUPS = flags.DEFINE_list("groups", None, "Subset of groups to start "
                            "(default: all).")
_PROGRESS = flags.DEFINE_float("progress_every", 15.0,
                               "Seconds between progress lines (0: none).")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early, saved, resumable.


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _die_with_parent(parent: int):
  """preexec_fn: the child gets SIGTERM when the launcher exits (Linux)."""

  def fn():
    try:
      # prctl(PR_SET_PDEATHSIG = 1, SIGTERM).
      ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
      return  # Not Linux: the launcher's own handlers still forward SIGTERM.
    if os.getppid() != parent:  # It died before prctl took effect.
      os.kill(os.getpid(), signal.SIGTERM)

  return fn


def commands(config_args: list[str], workdir: str, groups: list[int],
             procs: int, devices: int, platform: str | None):
  """(argv, env, log name) of every process to start."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = []
  for g in groups:
    port = free_port() if procs > 1 else None
    for p in range(procs):
      argv = [sys.executable, "-m", "codistill_jax.main", *config_args,
              f"--workdir={workdir}", f"--groups={g}"]
      if port:
        argv += [f"--coordinator_address=127.0.0.1:{port}",
                 f"--num_processes={procs}", f"--process_id={p}"]
      env = {**os.environ, "PYTHONPATH": root + os.pathsep +
             os.environ.get("PYTHONPATH", "")}
      if platform is not None:
        env["JAX_PLATFORMS"] = platform
      # Only the CPU platform reads this; on an accelerator it is a no-op.
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
      # Groups may share one accelerator: allocate on demand, not 75% each.
      env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
      out.append((argv, env, f"group_{g}.proc_{p}.log"))
  return out


def _last_row(workdir: str, g: int, key: str) -> dict | None:
  path = paths.metrics_file(workdir, g)
  if not os.path.exists(path):
    return None
  rows = [r for r in metrics_lib.read_jsonl(path) if key in r]
  return rows[-1] if rows else None


def _progress(workdir: str, groups: list[int], total: int) -> None:
  for g in groups:
    row = _last_row(workdir, g, "loss")
    if row:
      print(f"group {g}: step {row['step']}/{total}  loss {row['loss']:.4f}  "
            f"{row.get('steps_per_sec', 0):.1f} steps/s", flush=True)


def _error_line(log: str) -> str:
  """The child's `error:` line, or the tail of its log."""
  try:
    with open(log) as f:
      lines = f.read().splitlines()
  except OSError:
    return ""
  errors = [l for l in lines if l.startswith("error: ")]
  return errors[-1] if errors else "\n    ".join(lines[-5:])


def _summary(workdir: str, groups: list[int]) -> None:
  rows = {}
  for g in groups:
    row = _last_row(workdir, g, "step")
    evals = [r for r in (metrics_lib.read_jsonl(paths.metrics_file(workdir, g))
                         if row else []) if any("/" in k and not k.startswith(
                             ("staleness", "restore_failures", "service",
                              "stored")) for k in r)]
    if evals:
      rows[f"group {g}"] = evals[-1]
  ens = os.path.join(paths.ensemble_dir(workdir), "metrics.jsonl")
  if os.path.exists(ens) and metrics_lib.read_jsonl(ens):
    rows["ensemble"] = metrics_lib.read_jsonl(ens)[-1]
  if rows:
    keys = sorted({k for r in rows.values() for k in r
                   if k not in ("step", "time")})
    print("final metrics (step " + ", ".join(
        f"{n}: {r['step']}" for n, r in rows.items()) + "):", flush=True)
    print(f"  {'':<10}" + "".join(f"{k:>22}" for k in keys))
    for name, r in rows.items():
      print(f"  {name:<10}" + "".join(
          f"{r[k]:>22.4f}" if k in r else f"{'-':>22}" for k in keys))
  print(f"logs: {paths.logs_dir(workdir)}/  metrics: "
        f"{paths.group_dir(workdir, 0)[:-1]}*/metrics.jsonl  TensorBoard: "
        f"tensorboard --logdir={workdir}", flush=True)


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  num_groups = config.codistill.num_groups
  groups = cli.parse_groups(_GROUPS.value) or list(range(num_groups))
  # The same one-line errors as codistill_jax.main, before anything starts.
  # (Each child checks its own devices when it starts.)
  validate.validate(config, num_devices=1, num_groups_here=1)
  ckpt_lib.check_workdir(workdir, config)
  # Pass the config flags on exactly as given (file, ':arg' and overrides).
  config_args = [a for a in sys.argv[1:] if a.startswith("--config")]
  logdir = paths.logs_dir(workdir)
  os.makedirs(logdir, exist_ok=True)
  procs = []
  for cmd, env, log in commands(config_args, workdir, groups, _PROCS.value,
                                _DEVICES.value, _PLATFORM.value):
    f = open(os.path.join(logdir, log), "a")
    # Own session: a terminal's Ctrl-C reaches only the launcher, which turns
    # it into SIGTERM for every process (save a checkpoint, exit cleanly).
    procs.append((subprocess.Popen(
        cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=_die_with_parent(os.getpid())),
                  log, f))
    print(f"started {log}: {' '.join(cmd[1:])}", flush=True)

  stopping = []

  def forward(signum, frame):
    del frame
    stopping.append(signum)
    for proc, _, _ in procs:
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  codes, last_progress = {}, time.time()
  while len(codes) < len(procs):
    for proc, log, f in procs:
      if log not in codes and proc.poll() is not None:
        codes[log] = proc.returncode
        f.close()
        if proc.returncode:
          print(f"{log} failed (exit {proc.returncode}): "
                f"{_error_line(os.path.join(logdir, log))}", flush=True)
    if _PROGRESS.value and time.time() - last_progress > _PROGRESS.value:
      _progress(workdir, groups, config.total_steps)
      last_progress = time.time()
    time.sleep(0.2)

  _summary(workdir, groups)
  bad = [c for c in codes.values() if c]
  if bad:
    print(f"failed: see {logdir}/", flush=True)
    sys.exit(bad[0])
  saved = {g: (ckpt_lib.committed_steps(paths.checkpoints_dir(workdir, g))
               or [0])[-1] for g in groups}
  if any(s < config.total_steps for s in saved.values()):
    print(f"stopped early at steps {saved} of {config.total_steps}"
          f"{' after a signal' if stopping else ''}: every group saved; "
          "rerun the same command to resume", flush=True)
    sys.exit(EXIT_PREEMPTED)
  print(f"finished: {config.total_steps} steps in every group", flush=True)


if __name__ == "__main__":
  cli.run(main, required=("config", "workdir"))

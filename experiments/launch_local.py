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
  75  stopped early (SIGTERM or Ctrl-C to the launcher, a preemption) after
      at least one group saved a checkpoint: rerun the same command to resume
      (a group that saved nothing starts over)
  2   bad input (one `error:` line, as from codistill_jax.main), found here
      before any process starts, or by the groups' own checks
  128+N  stopped by signal N before any group saved: nothing to resume
  other  a group failed: its exit code, with its error line and log path

Everything the launcher can check is checked before a process starts or a
file is written: its own flags (positive counts, `--groups` of the config,
each once, a known `--platform`), the config (as through
`codistill_jax.main`, for one device per group) and the workdir (writable,
not a run of another config). A failed group's error also ends the
launcher's stderr as one `error:` line. SIGTERM or SIGINT to the launcher
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
from codistill_jax import cli
from codistill_jax import config_lib
from codistill_jax import paths
from codistill_jax.errors import ConfigError
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
# JAX's platform names (a comma-separated list picks the first that works).
PLATFORMS = ("cpu", "gpu", "cuda", "rocm", "tpu")


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
             procs: int, devices, platform: str | None):
  """(argv, env, log name) of every process to start; `devices`: each
  process's device count, or {group: count} (groups of unequal size)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = []
  for g in groups:
    per_process = devices[g] if isinstance(devices, dict) else devices
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
      env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count="
                          f"{per_process}")
      # Groups may share one accelerator: allocate on demand, not 75% each.
      env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
      out.append((argv, env, f"group_{g}.proc_{p}.log"))
  return out


def config_flags(argv: list[str]) -> list[str]:
  """The config flags exactly as given (file, ':arg' and overrides), for the
  children; a flag's value may be the next argument (`--config FILE`)."""
  out = []
  for i, a in enumerate(argv):
    if a == "--":
      break
    name = a.lstrip("-").partition("=")[0]
    if name == "config" or name.startswith(("config.", "noconfig.")):
      out.append(a)
      if ("=" not in a and not name.startswith("noconfig.") and
          i + 1 < len(argv) and not argv[i + 1].startswith("-")):
        out.append(argv[i + 1])
  return out


def _rows(path: str) -> list[dict]:
  """A metrics file's rows; [] while it is missing or unreadable (the
  launcher only reports: the groups own their files)."""
  # pylint: disable-next=g-import-not-at-top
  from codistill_jax import metrics as metrics_lib
  try:
    return metrics_lib.read_jsonl(path)
  except (OSError, ValueError):
    return []


def _last_row(workdir: str, g: int, key: str) -> dict | None:
  rows = [r for r in _rows(paths.metrics_file(workdir, g)) if key in r]
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
    evals = [r for r in _rows(paths.metrics_file(workdir, g))
             if any("/" in k and not k.startswith(
                 ("staleness", "restore_failures", "service", "stored"))
                    for k in r)]
    if evals:
      rows[f"group {g}"] = evals[-1]
  ensemble = _rows(os.path.join(paths.ensemble_dir(workdir), "metrics.jsonl"))
  if ensemble:
    rows["ensemble"] = ensemble[-1]
  if rows:
    keys = sorted({k for r in rows.values() for k in r
                   if k not in ("step", "time")})
    print("final metrics (step " + ", ".join(
        f"{n}: {r['step']}" for n, r in rows.items()) + "):", flush=True)
    print(f"  {'':<10}" + "".join(f"{k:>22}" for k in keys))
    for name, r in rows.items():
      print(f"  {name:<10}" + "".join(
          f"{r[k]:>22.4f}" if isinstance(r.get(k), (int, float)) else
          f"{'-':>22}" for k in keys))
  print(f"logs: {paths.logs_dir(workdir)}/  metrics: "
        f"{paths.group_dir(workdir, 0)[:-1]}*/metrics.jsonl  TensorBoard: "
        f"tensorboard --logdir={workdir}", flush=True)


def check_flags(config) -> list[int]:
  """The launcher's own flags (no JAX, nothing read); returns the groups."""
  cli.check_at_least(_PROCS.value, "--processes_per_group")
  cli.check_at_least(_DEVICES.value, "--devices_per_process")
  cli.check_at_least(_PROGRESS.value, "--progress_every", 0)
  num_groups = config.codistill.num_groups
  top = config_lib.max_groups(config)
  groups = cli.parse_groups(_GROUPS.value)
  for g in groups or ():
    cli.check_group(g, top, "--groups",
                    f"the config (config.codistill.num_groups={num_groups}"
                    + (f", max_groups={top}" if top > num_groups else "")
                    + ")")
    if groups.count(g) > 1:
      raise ConfigError(f"--groups={','.join(_GROUPS.value)} names group {g} "
                        "twice; a group is one job: name each once")
  for name in (_PLATFORM.value or "").split(","):
    if name and name.strip().lower() not in PLATFORMS:
      raise ConfigError(f"--platform={_PLATFORM.value}: {name!r} is no JAX "
                        f"platform; use one of {', '.join(PLATFORMS)} (or "
                        "leave --platform out: JAX picks what is here)")
  return groups or list(range(num_groups))


def failed_process(codes: dict[str, int], stopped: bool) -> str | None:
  """The first process that failed: it exited non-zero, or a signal the
  launcher did not send killed it (one killed by the launcher's own SIGTERM
  while it started, before it could save, did not fail)."""
  return next((log for log, c in codes.items()
               if c > 0 or (c < 0 and not stopped)), None)


def exit_code(saved: dict[int, int], total: int,
              signal_number: int | None) -> tuple[int, str]:
  """The exit code and last line of a launch in which no process failed.

  Args:
    saved: each group's newest committed step (0: none).
    total: config.total_steps.
    signal_number: the signal that stopped the launcher, if one did.
  """
  if all(s >= total for s in saved.values()):
    return 0, f"finished: {total} steps in every group"
  why = " after a signal" if signal_number else ""
  if any(saved.values()):
    fresh = [g for g, s in saved.items() if not s]
    return EXIT_PREEMPTED, (
        f"stopped early at steps {saved} of {total}{why}: rerun the same "
        "command to resume" + (f" (group(s) {fresh} saved nothing and start "
                               "over)" if fresh else ""))
  return (128 + signal_number if signal_number else 1), (
      f"stopped{why} before any group saved a checkpoint: nothing to "
      "resume; rerun the same command to start over")


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  groups = check_flags(config)
  # The same one-line errors as codistill_jax.main, before anything starts.
  # (Each child checks its own devices when it starts.) Imported here: the
  # flags' errors above do not pay for JAX.
  # pylint: disable=g-import-not-at-top
  from codistill_jax import checkpoint as ckpt_lib
  from codistill_jax import validate
  # pylint: enable=g-import-not-at-top
  # Each group's processes: its own `devices` (config.group.g<i>.devices)
  # split over them, else --devices_per_process each.
  devices = {}
  for g in groups:
    own = config_lib.group_config(config, g).devices
    if own and own % _PROCS.value:
      raise ConfigError(
          f"config.group.{config_lib.group_key(g)}.devices={own} does not "
          f"split over --processes_per_group={_PROCS.value}; use a multiple")
    devices[g] = own // _PROCS.value if own else _DEVICES.value
    # A group's own devices are checked here; otherwise each child checks
    # its devices when it starts.
    validate.validate(config, num_devices=own or 1, groups=[g])
  ckpt_lib.check_workdir(workdir, config)
  logdir = paths.logs_dir(workdir)
  cli.check_output(logdir, "the log directory under --workdir",
                   directory=True)
  todo = commands(config_flags(sys.argv[1:]), workdir, groups, _PROCS.value,
                  devices, _PLATFORM.value)
  for _, _, log in todo:
    cli.check_output(os.path.join(logdir, log), "a log under --workdir")

  # Handlers first: a signal while the processes start stops the rest.
  procs, stopping = [], []

  def forward(signum, frame):
    del frame
    stopping.append(signum)
    for proc, _, _ in procs:
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  os.makedirs(logdir, exist_ok=True)
  for cmd, env, log in todo:
    if stopping:
      break
    f = open(os.path.join(logdir, log), "a")
    # Own session: a terminal's Ctrl-C reaches only the launcher, which turns
    # it into SIGTERM for every process (save a checkpoint, exit cleanly).
    procs.append((subprocess.Popen(
        cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=_die_with_parent(os.getpid())),
                  log, f))
    print(f"started {log}: {' '.join(cmd[1:])}", flush=True)
    if stopping:  # Arrived while it started: it gets the SIGTERM too.
      forward(stopping[0], None)

  codes, last_progress = {}, time.time()
  while len(codes) < len(procs):
    for proc, log, f in procs:
      if log not in codes and proc.poll() is not None:
        codes[log] = proc.returncode
        f.close()
        if proc.returncode < 0 and stopping:
          print(f"{log} stopped by signal {-proc.returncode} while it "
                "started", flush=True)
        elif proc.returncode:
          print(f"{log} failed (exit {proc.returncode}): "
                f"{_error_line(os.path.join(logdir, log))}", flush=True)
    if _PROGRESS.value and time.time() - last_progress > _PROGRESS.value:
      _progress(workdir, groups, config.total_steps)
      last_progress = time.time()
    time.sleep(0.2)

  _summary(workdir, groups)
  saved = {g: (ckpt_lib.committed_steps(paths.checkpoints_dir(workdir, g))
               or [0])[-1] for g in groups}
  failed = failed_process(codes, bool(stopping))
  if failed:
    code = codes[failed] if codes[failed] > 0 else 128 - codes[failed]
    error = _error_line(os.path.join(logdir, failed)).removeprefix("error: ")
    print(f"failed: see {logdir}/", flush=True)
    cli.fail(f"{failed} (exit {codes[failed]}): "
             f"{error.splitlines()[0] if error else 'no error line'}; its "
             f"log: {os.path.join(logdir, failed)}", code=code)
  code, line = exit_code(saved, config.total_steps,
                         stopping[0] if stopping else None)
  print(line, flush=True)
  sys.exit(code)


if __name__ == "__main__":
  cli.run(main, required=("config", "workdir"))

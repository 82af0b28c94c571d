r"""Starts every group of a codistillation run as its own process(es) here.

Each group is an independent JAX job (`python -m codistill_jax.main
--groups=g`) on its own CPU device(s); groups share only the workdir, where
they publish and reload parameters. With `--processes_per_group=2` each group
is itself a two-process JAX job (jax.distributed over localhost, gloo CPU
collectives), i.e. the multi-host code path run for real.

  python experiments/launch_local.py --config=configs/flights_codistill.py \
      --workdir=/tmp/codistill [--config.codistill.num_groups=3] \
      [--processes_per_group=2] [--devices_per_process=1]

Logs go to WORKDIR/logs/group_<g>.proc_<p>.log. SIGTERM or SIGINT (Ctrl-C)
to the launcher becomes SIGTERM to every process (each saves a checkpoint and
exits); the launcher exits with the first non-zero exit code of its
processes.
"""

import os
import signal
import socket
import subprocess
import sys
import time

from absl import flags

from codistill_jax import cli
from codistill_jax import paths

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Shared workdir.")
_PROCS = flags.DEFINE_integer("processes_per_group", 1,
                              "Processes per group (a multi-process JAX job).")
_DEVICES = flags.DEFINE_integer("devices_per_process", 1,
                                "CPU devices per process.")
_PLATFORM = flags.DEFINE_string("platform", "cpu", "JAX_PLATFORMS for the "
                                "children ('' = let JAX choose).")
_GROUPS = flags.DEFINE_list("groups", None, "Subset of groups to start "
                            "(default: all).")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def commands(config_args: list[str], workdir: str, groups: list[int],
             procs: int, devices: int, platform: str):
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
      if platform:
        env["JAX_PLATFORMS"] = platform
      if platform == "cpu":
        env["XLA_FLAGS"] = (
            f"--xla_force_host_platform_device_count={devices}")
      out.append((argv, env, f"group_{g}.proc_{p}.log"))
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  num_groups = config.codistill.num_groups
  groups = (list(range(num_groups)) if _GROUPS.value is None
            else [int(g) for g in _GROUPS.value])
  # Pass the config flags on exactly as given (file, ':arg' and overrides).
  config_args = [a for a in sys.argv[1:] if a.startswith("--config")]
  logdir = paths.logs_dir(_WORKDIR.value)
  os.makedirs(logdir, exist_ok=True)
  procs = []
  for cmd, env, log in commands(config_args, _WORKDIR.value, groups,
                                _PROCS.value, _DEVICES.value, _PLATFORM.value):
    f = open(os.path.join(logdir, log), "a")
    # Own session: a terminal's Ctrl-C reaches only the launcher, which turns
    # it into SIGTERM for every process (save a checkpoint, exit cleanly).
    procs.append((subprocess.Popen(cmd, env=env, stdout=f,
                                   stderr=subprocess.STDOUT,
                                   start_new_session=True), log, f))
    print(f"started {log}: {' '.join(cmd[1:])}", flush=True)

  def forward(signum, frame):
    del signum, frame
    for proc, _, _ in procs:
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  codes = {}
  while len(codes) < len(procs):
    for proc, log, f in procs:
      if log not in codes and proc.poll() is not None:
        codes[log] = proc.returncode
        f.close()
        print(f"{log} exited with {proc.returncode}", flush=True)
    time.sleep(0.2)
  bad = [c for c in codes.values() if c]
  sys.exit(bad[0] if bad else 0)


if __name__ == "__main__":
  cli.run(main, required=("config", "workdir"))

r"""Turns a config's `sweep()` into one launch command per sweep point x group.

Every group of every sweep point is its own job (`python -m
codistill_jax.main --groups=g`); the groups of a point share the point's
workdir (and exchange directory: local disk, NFS or gs://). With
`--one_job`, each point is instead one (multi-host) job holding all its
groups, each group on a share of every host's devices. Each sweep point
reruns by hand from its printed flags.

  python experiments/sweep_launch.py --config=configs/flights_codistill.py \
      --workdir_root=/shared/sweeps/flights --launcher=slurm --dry_run

Launchers (`--launcher`):
  shell       background processes on this machine, logs under the workdir;
  slurm       one `sbatch` per group (`--nodes_per_group` nodes, one task
              each, jax.distributed set up from SLURM's environment);
  gcloud_tpu  one `gcloud compute tpus tpu-vm ssh --worker=all` per group on
              TPU VM slices named `<--tpu_prefix>-<point>-g<g>` (multi-host
              slices set up jax.distributed themselves).

Before printing or running anything, every command's flags are parsed with
the same config machinery as `main.py` and validated (`--novalidate` to
skip, e.g. where the data is not mounted), so a typo fails here and not in a
queue. `--dry_run` prints the commands; without it `shell` runs them and the
others print them for you to submit (this script never talks to a cluster).
"""

import os
import re
import shlex
import subprocess
import sys

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_CONFIG = flags.DEFINE_string(
    "config", None, "Config file with optional ':arg', as for main.py.")
_ROOT = flags.DEFINE_string(
    "workdir_root", None, "One workdir per sweep point is made under it (a "
    "path every job can reach: local disk for shell, NFS on a cluster).")
_EXCHANGE_ROOT = flags.DEFINE_string(
    "exchange_root", None, "If set, each point's groups exchange params under "
    "<exchange_root>/<point> (e.g. gs://bucket/sweep) instead of its workdir.")
_SWEEP = flags.DEFINE_string(
    "sweep", None, "A named sweep of the config (its `sweep(name)`, e.g. "
    "'churn'); default: `sweep()`.")
_LAUNCHER = flags.DEFINE_enum("launcher", "shell",
                              ["shell", "slurm", "gcloud_tpu"],
                              "How each group's job is started.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands only.")
_VALIDATE = flags.DEFINE_bool("validate", True,
                              "Parse and validate every command's config.")
_EXTRA = flags.DEFINE_multi_string(
    "extra", [], "More flags for every job, e.g. "
    "--extra=--config.total_steps=100 (repeat the flag for several).")
_NODES = flags.DEFINE_integer("nodes_per_group", 1,
                              "slurm: nodes (one JAX process each) per group "
                              "(with --one_job: per point).")
_ONE_JOB = flags.DEFINE_bool(
    "one_job", False, "One job per sweep point holding all its groups (a "
    "multi-host JAX job: the group count must divide each host's devices) "
    "instead of one job per group.")
_PYTHON = flags.DEFINE_string("python", "python",
                              "The Python on the machines that run the jobs.")
_TPU_PREFIX = flags.DEFINE_string("tpu_prefix", "codistill",
                                  "gcloud_tpu: TPU VM name prefix.")
_ZONE = flags.DEFINE_string("zone", "us-central2-b", "gcloud_tpu: zone.")
_REPO = flags.DEFINE_string("repo_dir", ROOT,
                            "Where this repository is on the job machines.")


def load_config_module(path: str):
  from codistill_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_module(path)


def flag_value(value) -> str:
  """A value as `--config.a.b=` parses it back (tuples in Python syntax)."""
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(flag_value(v) for v in value) + ("," if len(
        value) == 1 else "") + ")"
  return str(value)


def point_name(index: int, point: dict) -> str:
  """'p0_seed=0': a workdir name that says what the point changes."""
  parts = [f"{k.split('.')[-1]}={flag_value(v)}" for k, v in
           sorted(point.items())]
  return re.sub(r"[^\w.=,+-]", "", "_".join([f"p{index}", *parts]))[:120]


def job_argvs(config_arg: str, root: str, extra: list[str],
              exchange_root: str | None = None, sweep_name: str | None = None,
              one_job: bool = False):
  """[(point name, group, workdir, argv of main.py)] for the whole sweep.

  With `one_job`, one entry per point whose group is 'all' (no --groups).
  """
  path, _, arg = config_arg.partition(":")
  module = load_config_module(path)
  if sweep_name:
    points = module.sweep(sweep_name)
  else:
    points = module.sweep() if hasattr(module, "sweep") else [{}]
  out = []
  for i, point in enumerate(points):
    overrides = [f"--config.{k}={flag_value(v)}" for k, v in point.items()]
    config = module.get_config(arg or None)
    groups = point.get("codistill.num_groups", config.codistill.num_groups)
    for x in extra:  # An extra flag may set the group count too.
      m = re.fullmatch(r"--config\.codistill\.num_groups=(\d+)", x)
      groups = int(m.group(1)) if m else groups
    name = point_name(i, point)
    workdir = os.path.join(root, name)
    if exchange_root:  # Never shared between points: runs differ.
      overrides.append("--config.codistill.exchange_dir=" +
                       f"{exchange_root.rstrip('/')}/{name}")
    base = ["-m", "codistill_jax.main", f"--config={config_arg}",
            f"--workdir={workdir}"]
    if one_job:
      out.append((name, "all", workdir, [*base, *overrides, *extra]))
      continue
    for g in range(groups):
      out.append((name, g, workdir,
                  [*base, f"--groups={g}", *overrides, *extra]))
  return out


def validate(argv: list[str]) -> None:
  """Parses `argv` with main.py's config flags; raises on any problem."""
  from codistill_jax import config_lib  # pylint: disable=g-import-not-at-top
  config_arg = next(a.partition("=")[2] for a in argv
                    if a.startswith("--config="))
  config = config_lib.load(config_arg, [a[2:] for a in argv
                                        if a.startswith("--config.")])
  # One device per group is enough to check the fields; the cluster's own
  # divisibility is checked when each job starts (or by compile_check).
  from codistill_jax import validate as validate_lib  # pylint: disable=g-import-not-at-top
  validate_lib.validate(config, num_devices=1, num_groups_here=1)


def render(launcher: str, name: str, group: int | str, workdir: str,
           argv: list[str]) -> str:
  """One shell command line that starts this group's job (or 'all')."""
  cmd = " ".join(shlex.quote(a) for a in [_PYTHON.value, *argv])
  logs = os.path.join(workdir, "logs")
  if launcher == "shell":
    return (f"mkdir -p {shlex.quote(logs)} && cd {shlex.quote(_REPO.value)} "
            f"&& nohup {cmd} > {shlex.quote(logs)}/group_{group}.log 2>&1 &")
  if launcher == "slurm":
    dist = ""
    if _NODES.value > 1 or group == "all":
      # jax.distributed from SLURM's environment (coordinator: first node).
      dist = " --coordinator_address=auto"
    wrap = f"cd {shlex.quote(_REPO.value)} && srun {cmd}{dist}"
    return (f"mkdir -p {shlex.quote(logs)} && sbatch --job-name={name}-g"
            f"{group} --nodes={_NODES.value} --ntasks-per-node=1 "
            f"--output={shlex.quote(logs)}/group_{group}.%j.log "
            f"--wrap={shlex.quote(wrap)}")
  if launcher == "gcloud_tpu":
    tpu = re.sub(r"[^a-z0-9-]", "-", f"{_TPU_PREFIX.value}-{name}".lower())
    remote = (f"cd {shlex.quote(_REPO.value)} && {cmd} "
              "--coordinator_address=auto")
    return (f"gcloud compute tpus tpu-vm ssh {tpu}-g{group} "
            f"--zone={_ZONE.value} --worker=all "
            f"--command={shlex.quote(remote)}")
  raise ValueError(launcher)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  jobs = job_argvs(_CONFIG.value, _ROOT.value, _EXTRA.value,
                  _EXCHANGE_ROOT.value, _SWEEP.value, _ONE_JOB.value)
  if _VALIDATE.value:
    for name, g, _, job in jobs:
      try:
        validate(job)
      except Exception as e:  # pylint: disable=broad-except
        print(f"error: sweep point {name} group {g}: "
              f"{' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
  lines = [render(_LAUNCHER.value, *job) for job in jobs]
  for line in lines:
    print(line, flush=True)
  if not _DRY_RUN.value and _LAUNCHER.value == "shell":
    for line in lines:
      subprocess.run(line, shell=True, check=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir_root"])
  app.run(main)

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
queue; so are this script's own flags (the config file and its `sweep()`,
`--sweep`, `--extra`, `--nodes_per_group`, and where `shell` runs the jobs
(no `--dry_run`) the paths it writes and runs: `--workdir_root` and each
point's workdir, `--repo_dir`, `--python`). Bad input is one `error:` line and exit code 2 with nothing
printed, started or written. `--dry_run` prints the commands; without it
`shell` runs them and the others print them for you to submit (this script
never talks to a cluster).
"""

import os
import re
import shlex
import shutil
import subprocess
import sys

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# pylint: disable=g-import-not-at-top,wrong-import-position
from codistill_jax import cli
from codistill_jax.errors import ConfigError
# pylint: enable=g-import-not-at-top,wrong-import-position

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


def sweep_points(module, path: str, sweep_name: str | None) -> list[dict]:
  """The config file's sweep points, checked to be a list of dicts of
  dotted overrides."""
  sweep = getattr(module, "sweep", None)
  if sweep_name and not callable(sweep):
    raise ConfigError(f"--sweep={sweep_name}: {path} defines no sweep()")
  try:
    points = (sweep(sweep_name) if sweep_name else
              sweep() if callable(sweep) else [{}])
  except Exception as e:  # pylint: disable=broad-except
    what = f"sweep({sweep_name!r})" if sweep_name else "sweep()"
    raise ConfigError(f"{'--sweep=' + sweep_name if sweep_name else path}: "
                      f"{what} raised {type(e).__name__}: "
                      f"{' '.join(str(e).split())}") from None
  if not isinstance(points, (list, tuple)) or not points or not all(
      isinstance(p, dict) and all(isinstance(k, str) for k in p)
      for p in points):
    raise ConfigError(f"{path}: sweep({sweep_name or ''}) must return a "
                      "non-empty list of dicts of dotted overrides, e.g. "
                      "[{'seed': 0}, {'seed': 1}]")
  return list(points)


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
  from codistill_jax import config_lib  # pylint: disable=g-import-not-at-top
  path = config_arg.partition(":")[0]
  module = load_config_module(path)
  points = sweep_points(module, path, sweep_name)
  config = config_lib.load_file(config_arg)  # One line if get_config fails.
  out = []
  for i, point in enumerate(points):
    overrides = [f"--config.{k}={flag_value(v)}" for k, v in point.items()]
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


def job_config(argv: list[str], validate: bool = True):
  """The config `argv` (main.py's flags) gives; raises on any problem.

  With `validate`, the config is checked as main.py checks it, but for one
  device per group: the cluster's own divisibility is checked when each job
  starts (or by compile_check).
  """
  # pylint: disable=g-import-not-at-top
  from codistill_jax import config_lib
  from codistill_jax import validate as validate_lib
  # pylint: enable=g-import-not-at-top
  config_arg = next(a.partition("=")[2] for a in argv
                    if a.startswith("--config="))
  config = config_lib.load(config_arg, [a[2:] for a in argv
                                        if a.startswith("--config.")])
  if validate:
    validate_lib.validate(config, num_devices=1, num_groups_here=1)
  return config


def check_flags() -> None:
  """This script's own flags (nothing read but the paths it names)."""
  cli.check_at_least(_NODES.value, "--nodes_per_group")
  for x in _EXTRA.value:
    name = x.partition("=")[0]
    if not x.startswith("--") or name == "--":
      raise ConfigError(f"--extra={x} is not a flag; pass main.py's flags, "
                        "e.g. --extra=--config.total_steps=100")
    if name in ("--config", "--workdir", "--groups"):
      raise ConfigError(f"--extra={x}: {name} is set per job by this script; "
                        "use --config / --workdir_root, or drop it")
  for value, flag in ((_ROOT.value, "--workdir_root"),
                      (_EXCHANGE_ROOT.value, "--exchange_root")):
    if value and "://" not in value and os.path.isfile(value):
      raise ConfigError(f"{flag}={value} is a file; name a directory")
  if _LAUNCHER.value == "gcloud_tpu" and not (_TPU_PREFIX.value and
                                               _ZONE.value):
    raise ConfigError("--launcher=gcloud_tpu needs --tpu_prefix and --zone")
  if _LAUNCHER.value != "shell" or _DRY_RUN.value:
    return  # The paths are the cluster's, not this machine's.
  if "://" in _ROOT.value:
    raise ConfigError(f"--workdir_root={_ROOT.value}: the shell launcher "
                      "writes workdirs on this machine; name a local path")
  cli.check_output(_ROOT.value, "--workdir_root", directory=True)
  cli.check_dir(_REPO.value, "--repo_dir", "checkout of this repository")
  if not shutil.which(_PYTHON.value):
    raise ConfigError(f"--python={_PYTHON.value}: no such program here; name "
                      f"the Python that runs the jobs, e.g. "
                      f"--python={sys.executable}")


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
  del argv
  check_flags()
  jobs = job_argvs(_CONFIG.value, _ROOT.value, _EXTRA.value,
                   _EXCHANGE_ROOT.value, _SWEEP.value, _ONE_JOB.value)
  local = _LAUNCHER.value == "shell" and not _DRY_RUN.value
  if _VALIDATE.value or local:
    from codistill_jax import checkpoint  # pylint: disable=g-import-not-at-top
    for name, g, workdir, job in jobs:
      try:
        config = job_config(job, validate=_VALIDATE.value)
        if local:  # Writable here, and no run of another config.
          checkpoint.check_workdir(workdir, config)
      except ConfigError as e:
        raise ConfigError(f"sweep point {name} group {g}: {e}") from None
  lines = [render(_LAUNCHER.value, *job) for job in jobs]
  for line in lines:
    print(line, flush=True)
  if local:
    for line in lines:
      result = subprocess.run(line, shell=True, check=False)
      if result.returncode:
        cli.fail(f"exit {result.returncode} from: {line}; the commands "
                 "before it were started", code=1)


if __name__ == "__main__":
  cli.run(main, required=("config", "workdir_root"),
          output="--workdir_root")

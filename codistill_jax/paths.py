"""Where a run's files live: the one definition of the run-directory layout.

  WORKDIR/config.json                      the run's config (its identity)
  WORKDIR/group_<g>/checkpoints/<step>/    own TrainState checkpoints (Orbax)
  WORKDIR/group_<g>/writer.lock            who writes this group (one process)
  WORKDIR/group_<g>/metrics.jsonl          every metric; TensorBoard events
                                           beside it
  WORKDIR/ensemble/                        ensemble and agreement metrics
  WORKDIR/logs/                            per-process logs of the launcher
  WORKDIR/profile/                         jax.profiler traces (--profile_steps)
  EXCHANGE_DIR/runs/<run>/run.json         a run's config, for the humans and
                                           messages that meet it there
  EXCHANGE_DIR/runs/<run>/group_<g>/member.json
                                           the run's manifest, one entry per
                                           group that ever published: its
                                           architecture, devices, when it
                                           joined and whether it left
  EXCHANGE_DIR/runs/<run>/group_<g>/published/<step>/
                                           params a group publishes for its
                                           peers; <run> is the run's identity
                                           (checkpoint.run_identity), so many
                                           runs can share one EXCHANGE_DIR
                                           (which defaults to WORKDIR)

Every command, test and experiment builds these paths here, so the layout
changes in one place.
"""

import os


def config_file(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def group_dir(workdir: str, group: int) -> str:
  return os.path.join(workdir, f"group_{group}")


def checkpoints_dir(workdir: str, group: int) -> str:
  return os.path.join(group_dir(workdir, group), "checkpoints")


def metrics_file(workdir: str, group: int) -> str:
  return os.path.join(group_dir(workdir, group), "metrics.jsonl")


def ensemble_dir(workdir: str) -> str:
  return os.path.join(workdir, "ensemble")


def logs_dir(workdir: str) -> str:
  return os.path.join(workdir, "logs")


def profile_dir(workdir: str) -> str:
  """jax.profiler traces (--profile_steps): TensorBoard's profile plugin."""
  return os.path.join(workdir, "profile")


def lock_file(workdir: str, group: int) -> str:
  return os.path.join(group_dir(workdir, group), "writer.lock")


def runs_dir(exchange_dir: str) -> str:
  return os.path.join(exchange_dir, "runs")


def run_dir(exchange_dir: str, run: str) -> str:
  """One run's folder of published params under a shared exchange dir."""
  return os.path.join(runs_dir(exchange_dir), run)


def published_dir(run_dir_: str, group: int) -> str:
  """Where `group` publishes, under its run's folder (`run_dir`)."""
  return os.path.join(run_dir_, f"group_{group}", "published")


MEMBER_FILE = "member.json"


def member_key(group: int) -> str:
  """Group `group`'s manifest entry, relative to its run's folder."""
  return f"group_{group}/{MEMBER_FILE}"


def exchange_dir(config, workdir: str) -> str:
  """config.codistill.exchange_dir, or the workdir when it is ''."""
  return config.codistill.exchange_dir or workdir

"""Command-line entry point: flags in, one call to `train.train_and_evaluate`.

  python -m codistill_jax.main --config=configs/flights.py[:quick] \
      --workdir=/tmp/run [--config.a.b=value ...]

Bad input (unknown or mistyped config fields, a bad config file, a batch that
the devices do not divide, missing data, a workdir of another run) ends with a
one-line `error: ...` message and exit code 2, before anything is compiled or
written.
"""

import errno
import glob
import logging as pylogging
import os
import re
import shutil
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from codistill_jax.errors import ConfigError
from codistill_jax.errors import StorageError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with ':arg'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and TensorBoard events.")
_GROUPS = flags.DEFINE_list(
    "groups", None, "Groups this job runs, e.g. '0' or '0,1' (default: all "
    "config.codistill.num_groups). Other groups are separate jobs that share "
    "the exchange directory.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process "
    "JAX job (jax.distributed), or 'auto' to take it and the process count and "
    "id from the cluster (SLURM, Cloud TPU VMs, ...); unset for one process.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in this JAX job (with "
    "--coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in the JAX job.")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


# The filesystem refusing a write (a full, read-only or missing workdir).
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_REFUSED = _FULL + (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)


def _fail_now(message: str) -> None:
  """_fail for a write that failed mid-run: skips the interpreter's exit.

  Orbax's writer threads of the failed save are still unwinding; a normal exit
  would print their errors after ours. Nothing they hold is committed.
  """
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(2)  # pylint: disable=protected-access


def _committed_steps(workdir: str) -> list[str]:
  """Committed own checkpoints (step dirs with plain numeric names)."""
  return [d for d in glob.glob(os.path.join(workdir, "group_*", "checkpoints",
                                            "*"))
          if os.path.basename(d).isdigit()]


def _one_line(text: str) -> str:
  return " ".join(str(text).replace("\\'", "'").split())


def _flag_error(e: Exception) -> str:
  """One line for an error raised while parsing flags or loading the config."""
  text = str(e).replace("\\'", "'")
  wrapped = re.search(r"ConfigError: (.*)", text)  # From get_config(arg).
  if wrapped:
    return wrapped.group(1)
  unknown = re.search(r"'(\w+)'.*?(Did you mean [^?]*\?)", text, re.S)
  cause = e.__cause__ or e.__context__
  if isinstance(e, KeyError) or isinstance(cause, KeyError) or unknown:
    name = re.search(r"'([\w.]+)'", text)
    field = unknown.group(1) if unknown else name.group(1) if name else text
    hint = f"; {unknown.group(2)}" if unknown else ""
    return f"unknown config field {field!r}{hint}"
  if isinstance(e, OSError):
    return f"--config could not be loaded: {text.splitlines()[-1].strip()}"
  return f"bad flag: {_one_line(text)}"


def _parse_flags(argv):
  """absl's parser, but bad flags give one line and exit code 2."""
  try:
    rest = flags.FLAGS(argv)
    config = _CONFIG.value
    if config is not None:
      config.keys()  # A file that failed to load raises on first use.
  except ConfigError as e:
    _fail(str(e))
  except (flags.Error, KeyError, OSError, AttributeError, TypeError,
          ValueError) as e:
    _fail(_flag_error(e))
  if config is None:
    _fail("--config is required, e.g. --config=configs/flights.py:quick")
  if not _WORKDIR.value:
    _fail("--workdir is required, e.g. --workdir=/tmp/codistill_run")
  if _GROUPS.value is not None and not all(
      g.strip().isdigit() for g in _GROUPS.value):
    _fail(f"--groups={','.join(_GROUPS.value)} must be group indices, e.g. "
          "--groups=0,1")
  if _COORDINATOR.value not in (None, "", "auto") and (
      _NUM_PROCESSES.value is None or _PROCESS_ID.value is None):
    _fail("--coordinator_address needs --num_processes and --process_id "
          "(or use --coordinator_address=auto on SLURM or Cloud TPU VMs)")
  return rest


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of Orbax internals; keeps warnings and ours."""

  def filter(self, record):
    if "/orbax/" not in record.pathname:
      return True
    # Orbax warns about a missing per-item metadata file that its own
    # CheckpointManager never writes; keep every other warning.
    return (record.levelno >= pylogging.WARNING and
            "Metadata file does not exist" not in record.getMessage())


def main(argv):
  pylogging.getLogger("absl").addFilter(_QuietLibraries())
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; config overrides are flags: "
          "--config.a.b=value")
  # Imported here so that `--help` and flag errors do not pay for jax.
  import jax  # pylint: disable=g-import-not-at-top
  from codistill_jax import train  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    if jax.config.jax_platforms in ("cpu", None) or "cpu" in str(
        jax.config.jax_platforms):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if _COORDINATOR.value == "auto":  # The cluster's environment says.
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                                 _PROCESS_ID.value)
  groups = None if _GROUPS.value is None else [int(g) for g in _GROUPS.value]
  # A job of every group alone owns a workdir it creates; see the cleanup.
  owns_new_workdir = (groups is None and not _COORDINATOR.value and
                      not os.path.exists(_WORKDIR.value))
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, groups=groups)
  except StorageError as e:
    _fail_now(str(e))
  except ConfigError as e:
    if owns_new_workdir and not _committed_steps(_WORKDIR.value):
      # Found once set-up had begun (a data file that does not parse, an init
      # checkpoint of another architecture): leave no half-made run dir that
      # a rerun would take for this run. With --groups other jobs may share
      # the dir, so it stays.
      shutil.rmtree(_WORKDIR.value, ignore_errors=True)
    _fail(str(e))
  except OSError as e:
    if e.errno not in _REFUSED or not e.filename:
      raise
    fix = ("free space or point --workdir at a filesystem with room"
           if e.errno in _FULL else "point --workdir at a writable directory")
    _fail_now(f"cannot write {e.filename}: {e.strerror}; {fix}, then rerun "
              "the same command: it resumes from the last committed "
              "checkpoint")
  except FloatingPointError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()

"""What every command shares: the config flag, and one line for bad input.

`define_config_flag()` gives `--config=file.py[:arg]` plus `--config.a.b=v`
overrides (ml_collections `config_flags`), with files loaded by
`config_lib.load_file`. `run(main)` is `absl.app.run` where bad input of
any kind -- a flag, a config file that does not load, an override of no
field, a ConfigError from the library, storage that refuses a write -- ends
with one `error: ...` line on stderr and exit code 2, and `--help` exits 0.
Nothing follows that line: the exit skips the interpreter's teardown
(`fail`), and a failed read's late callbacks on closed event loops are not
printed (`_without_closed_loop_noise`). Anything else is an internal error
and raises normally.

A command checks all of its input before it does any work: the `check_*`
helpers below (numbers, input directories, output paths, run directories,
group indices) raise ConfigError naming the flag and the fix, and import
nothing heavy, so a command that checks first and imports JAX after answers
bad input in a fraction of a second.
"""

import errno
import json
import logging as pylogging
import os
import re
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from codistill_jax import config_lib
from codistill_jax import paths
from codistill_jax.errors import ConfigError

# The filesystem refusing a write (a full, read-only or missing workdir).
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_REFUSED = _FULL + (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)


class _ConfigFileParser(flags.ArgumentParser):
  """Loads `--config=file.py[:arg]` with config_lib (one-line errors), locked.

  Stands in for config_flags' own parser, which turns a file that does not
  load into a traceback on first use of the config.
  """

  def __init__(self, flag_name: str):
    super().__init__()
    self._name = flag_name

  def parse(self, argument):
    config = config_lib.load_file(argument)
    # `--config.group.g<i>.<field>=v` may name an entry (or a model field)
    # the file did not write: it is created here, before config_flags
    # defines one override flag per existing field (and sets it again).
    prefix = f"--{self._name}.{config_lib.GROUP_PREFIX}"
    for arg in flags.FLAGS.read_flags_from_files(sys.argv, force_gnu=False):
      if arg.startswith(prefix) and "=" in arg:
        dotted, _, value = arg[len(self._name) + 3:].partition("=")
        config_lib.set_group_field(config, dotted, value)
    config.lock()
    return config

  def flag_type(self):
    return "config object"


def define_config_flag(name: str = "config") -> flags.FlagHolder:
  """`--config=file.py[:arg]` with `--config.a.b=value` overrides."""
  holder = config_flags.DEFINE_config_file(
      name, None, "Experiment config file, optionally with ':arg'; override "
      "fields with --config.a.b=value.", lock_config=True)
  flags.FLAGS[name].parser = _ConfigFileParser(name)
  return holder


def fail(message: str, code: int = 2) -> None:
  """Prints `error: message` (one line) and exits with `code` at once.

  The interpreter's own exit is skipped: Orbax's and asyncio's threads of a
  failed save or restore would print their tracebacks after our line.
  Nothing they hold is committed, and the trainer has already released its
  locks (train.py).
  """
  print(f"error: {_one_line(message)}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  pylogging.shutdown()
  os._exit(code)  # pylint: disable=protected-access


def _one_line(text) -> str:
  return " ".join(str(text).replace("\\'", "'").split())


def _config_error_in(e: BaseException) -> ConfigError | None:
  """The ConfigError that `e` wraps (absl re-raises parser errors)."""
  while e is not None:
    if isinstance(e, ConfigError):
      return e
    e = e.__cause__ or e.__context__
  return None


def flag_error(e: Exception) -> str:
  """One line for an error raised while parsing flags or the config."""
  wrapped = _config_error_in(e)
  if wrapped is not None:
    return str(wrapped)
  text = _one_line(e)
  typed = re.fullmatch(r"flag --config\.([\w.]+)=(.*?): (.*)", text)
  if typed:
    return f"config.{typed.group(1)}={typed.group(2)!r}: {typed.group(3)}"
  unknown = re.search(r"'([\w.]+)'.*?(Did you mean [^?]*\?)", text)
  cause = e.__cause__ or e.__context__
  if isinstance(e, KeyError) or isinstance(cause, KeyError) or unknown:
    name = re.search(r"'([\w.]+)'", text)
    field = unknown.group(1) if unknown else name.group(1) if name else text
    hint = f"; {unknown.group(2)}" if unknown else ""
    return f"unknown config field {field!r}{hint}"
  return f"bad flag: {text}"


def _parse_flags(argv: Sequence[str], required: Sequence[str],
                 positional: bool = False):
  """absl's parser, but bad flags give one line and exit 2; --help exits 0."""
  if any(a in ("--help", "-h", "--helpfull", "-?") for a in argv[1:]):
    print(flags.FLAGS.main_module_help() if "--helpfull" not in argv
          else flags.FLAGS.get_help(), flush=True)
    sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
    for name in required:
      value = flags.FLAGS[name].value
      if value is None or value == "":
        fail(f"--{name} is required")
      if hasattr(value, "keys"):
        value.keys()  # A config that failed to load raises on first use.
  except (flags.Error, KeyError, OSError, AttributeError, TypeError,
          ValueError) as e:
    fail(flag_error(e))
  if len(rest) > 1 and not positional:
    fail(f"unexpected arguments {rest[1:]}; config overrides are flags: "
         "--config.a.b=value")
  return rest


def parse_groups(values: Sequence[str] | None) -> list[int] | None:
  """`--groups=0,1` -> [0, 1] (None: all groups)."""
  if values is None:
    return None
  if not values or not all(v.strip().isdigit() for v in values):
    raise ConfigError(f"--groups={','.join(values)} must be group indices, "
                      "e.g. --groups=0,1")
  return [int(v) for v in values]


# JAX's own variable wins, so that one cache serves JAX and this project.
DEFAULT_COMPILATION_CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR") or (
    os.path.join("~", ".cache", "codistill_jax", "jax"))


def enable_compilation_cache(path: str) -> None:
  """JAX's persistent compilation cache at `path` ('' leaves it off).

  Every compiled program is kept (no minimum compile time or size), so a
  rerun of a config skips XLA's compilation: the steps, evals, restores.
  """
  if not path:
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def parse_steps(text: str | None, flag: str) -> tuple[int, int] | None:
  """'a:b' -> (a, b) with 0 <= a < b; None for None or ''."""
  if not text:
    return None
  m = re.fullmatch(r"(\d+):(\d+)", text.strip())
  if not m or int(m.group(1)) >= int(m.group(2)):
    raise ConfigError(f"{flag}={text} must be 'a:b' with a < b, e.g. "
                      f"{flag}=10:20")
  return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------
# A command's input, checked before any work: numbers, paths, runs, groups.
# ----------------------------------------------------------------------------

def check_at_least(value, flag: str, minimum: float = 1) -> None:
  """`value` (a flag's number) is at least `minimum`."""
  if value is None or value < minimum:
    what = "a positive number" if minimum == 1 else f"at least {minimum}"
    raise ConfigError(f"{flag}={value} must be {what}, e.g. "
                      f"{flag}={max(minimum, 1)}")


def check_dir(path: str | None, flag: str, what: str = "directory") -> None:
  """`path` is an existing directory this process may read."""
  if not path:
    raise ConfigError(f"{flag} is empty; name a {what}")
  if os.path.islink(path) and not os.path.exists(path):
    raise ConfigError(f"{flag}={path} is a dangling symlink or a symlink "
                      f"loop; name a {what}")
  if not os.path.exists(path):
    raise ConfigError(f"{flag}={path}: no such {what}; name an existing one")
  if not os.path.isdir(path):
    raise ConfigError(f"{flag}={path} is a file, not a {what}; name a {what}")
  if not os.access(path, os.R_OK | os.X_OK):
    raise ConfigError(f"{flag}={path} is not readable by this user")


def check_output(path: str | None, flag: str, directory: bool = False,
                 new: bool = False) -> None:
  """`path` can be written as a file (or a directory), without writing.

  Args:
    path: the output a command will write.
    flag: the flag that named it ('--out'), or words for an output the
      command names itself ('the report under --workdir'), for the message.
    directory: a directory is written there, not a file.
    new: `path` must not exist yet (it is never overwritten); otherwise an
      existing file (directory) of the right kind is replaced (written into).
  """
  kind = "directory" if directory else "file"
  if not path:
    raise ConfigError(f"{flag} is empty; name a {kind} to write")
  where = f"{flag}={path}" if flag.startswith("-") else f"{flag} {path}"
  if "://" in path:
    raise ConfigError(f"{where}: write to a local or NFS path")
  if os.path.lexists(path):
    if new:
      raise ConfigError(f"{where} exists and is never overwritten: remove it "
                        "or name a new path")
    if not os.path.exists(path):
      raise ConfigError(f"{where} is a dangling symlink or a symlink loop; "
                        "remove it or name another path")
    if os.path.isdir(path) != directory:
      raise ConfigError(f"{where} is a {'file' if directory else 'directory'}"
                        f"; name a {kind}")
  # What is written: the output itself where it exists, else its nearest
  # existing ancestor, which must be a directory (access() also sees a
  # read-only filesystem, even for root).
  probe = os.path.abspath(path)
  while not os.path.lexists(probe):
    probe = os.path.dirname(probe)
  if probe != os.path.abspath(path) and not os.path.isdir(probe):
    raise ConfigError(f"{where}: {probe} is a file, not a directory; name a "
                      f"{kind} whose parent is a directory")
  if not os.access(probe, os.W_OK):
    raise ConfigError(f"{where}: {probe} is read-only for this user; name a "
                      f"{kind} this user can write")


def check_run(workdir: str | None, flag: str = "--workdir"):
  """The config (a ConfigDict, from its config.json) of the run at `workdir`.

  Raises ConfigError naming `flag` if `workdir` is no codistill_jax run
  directory, or its config.json (the run's identity) is damaged.
  """
  check_dir(workdir, flag, "run directory")
  path = paths.config_file(workdir)
  if not os.path.isfile(path):
    raise ConfigError(f"{flag}={workdir} is not a codistill_jax run "
                      "directory (no config.json); name the --workdir a run "
                      "was trained in")
  try:
    with open(path) as f:
      config = json.load(f)
    if not isinstance(config, dict):
      raise ValueError("not a JSON object")
    for key, kind in (("model_name", str), ("model", dict), ("data", dict),
                      ("codistill", dict)):
      if not isinstance(config.get(key), kind):
        raise ValueError(f"no {kind.__name__} {key!r}")
    groups = config["codistill"].get("num_groups")
    if not isinstance(groups, int) or groups < 1:
      raise ValueError(f"codistill.num_groups={groups!r}")
  except (OSError, ValueError) as e:
    raise ConfigError(f"{flag}={workdir}: its config.json (the run's "
                      f"identity) is damaged ({_one_line(e)}); repair it or "
                      "name another run") from None
  return ml_collections.ConfigDict(config)


def check_group(group: int | None, num_groups: int, flag: str,
                where: str) -> None:
  """`group` is one of the `num_groups` groups of `where` (a run, a config)."""
  if group is None or not 0 <= group < num_groups:
    have = ("only group 0" if num_groups == 1 else
            f"groups 0..{num_groups - 1}")
    raise ConfigError(f"{flag}={group}: {where} has {have}; name one of them")


# How long the processes of one job may start apart (see init_distributed).
DISTRIBUTED_START_MINUTES = 5


def init_distributed(address: str | None, num_processes: int | None,
                     process_id: int | None) -> None:
  """Joins a multi-process JAX job (`jax.distributed`), or does nothing.

  Args:
    address: host:port of process 0, 'auto' (the cluster's environment
      says: SLURM, Cloud TPU VMs), or None / '' for one process.
    num_processes: processes in the job (with a host:port address).
    process_id: this process's index (with a host:port address).
  """
  if not address:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ConfigError("--num_processes/--process_id need "
                        "--coordinator_address=host:port (or 'auto')")
    return
  if address != "auto":
    if num_processes is None or process_id is None:
      raise ConfigError("--coordinator_address needs --num_processes and "
                        "--process_id (or use --coordinator_address=auto on "
                        "SLURM or Cloud TPU VMs)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id} must be in [0, "
                        f"--num_processes={num_processes})")
    if not re.fullmatch(r"[\w.\-\[\]:]+:\d+", address):
      raise ConfigError(f"--coordinator_address={address} must be host:port "
                        "or 'auto'")
  import jax  # pylint: disable=g-import-not-at-top
  platforms = str(jax.config.jax_platforms or "cpu")
  if "cpu" in platforms:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # The CPU backend's topology exchange waits for every process (JAX's
    # default: 2 minutes for the local, 5 for the global one). On a loaded
    # host the job's processes can start minutes apart; JAX's own
    # initialization_timeout is 5 minutes, so wait as long here.
    jax.config.update("jax_cpu_get_local_topology_timeout_minutes",
                      DISTRIBUTED_START_MINUTES)
    jax.config.update("jax_cpu_get_global_topology_timeout_minutes",
                      DISTRIBUTED_START_MINUTES + 1)
  if address == "auto":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(address, num_processes, process_id)


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of Orbax internals; keeps warnings and ours.

  `--verbosity=1` (absl's flag) keeps everything.
  """

  def filter(self, record):
    if "/orbax/" not in record.pathname or logging.get_verbosity() >= 1:
      return True  # Ours, or --verbosity=1 asked for the libraries' too.
    # Orbax warns about a missing per-item metadata file that its own
    # CheckpointManager never writes; keep every other warning.
    return (record.levelno >= pylogging.WARNING and
            "Metadata file does not exist" not in record.getMessage())


def _without_closed_loop_noise(hook):
  """`sys.unraisablehook` less asyncio's 'Event loop is closed'.

  When an Orbax read fails (a corrupt checkpoint), tensorstore's callbacks
  for the read's other pieces still arrive, on its threads, after Orbax has
  closed the read's event loop; each raises this in a thread nobody waits
  on, which Python prints as a bare traceback around our one `error:` line.
  The failure itself is what the command reports.
  """

  def hook_(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError) and
        str(unraisable.exc_value) == "Event loop is closed"):
      return
    hook(unraisable)

  return hook_


def run(main: Callable[[list[str]], None], required: Sequence[str] = (),
        positional: bool = False, output: str = "--workdir") -> None:
  """`app.run(main)` with one-line errors for bad input (see module doc).

  Args:
    main: called with argv (the program name, then positional arguments).
    required: flags that must be given.
    positional: whether the command takes positional arguments.
    output: the flag that says where the command writes, named when the
      filesystem refuses a write ('--workdir': a rerun resumes).
  """

  def guarded(argv):
    pylogging.getLogger("absl").addFilter(_QuietLibraries())
    sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)
    try:
      main(argv)
    except ConfigError as e:  # Bad input, or storage refusing a write.
      fail(str(e))
    except OSError as e:
      if e.errno not in _REFUSED or not e.filename:
        raise
      fix = (f"free space or point {output} at a filesystem with room"
             if e.errno in _FULL else
             f"point {output} at a writable directory")
      resumes = (": it resumes from the last committed checkpoint"
                 if output == "--workdir" else "")
      fail(f"cannot write {e.filename}: {e.strerror}; {fix}, then rerun the "
           f"same command{resumes}")
    except FloatingPointError as e:
      fail(str(e), code=1)
    except KeyboardInterrupt:  # Before the loop (which saves and exits 0).
      fail("interrupted before training started; nothing was saved: rerun "
           "the same command" if output == "--workdir" else
           "interrupted: rerun the same command", code=130)
    except RuntimeError as e:
      if "Unable to initialize backend" not in str(e):
        raise
      if any(w in str(e) for w in ("DEADLINE_EXCEEDED", "timed out",
                                   "Timed out", "topology")):
        # The job's processes never met (one did not start, or started
        # later than the timeouts allow): not a missing platform.
        fail(f"the processes of this JAX job did not all join within "
             f"{DISTRIBUTED_START_MINUTES} minutes ({_one_line(e)[:200]}); "
             "start every process of the job (--num_processes of them, with "
             "the same --coordinator_address), then rerun")
      platforms = os.environ.get("JAX_PLATFORMS", "")
      fail(f"JAX_PLATFORMS={platforms!r}: {str(e).split(':', 1)[0]}; this "
           "machine has no such platform: unset JAX_PLATFORMS (JAX then "
           "picks what is here) or install its plugin (pip install -e "
           ".[cuda] / .[tpu])")

  app.run(guarded, flags_parser=lambda argv: _parse_flags(argv, required,
                                                         positional))

"""Own-state checkpoints (Orbax): save, resume, init-from, and run identity.

A group's whole `TrainState` (params, optimizer state, step, rng) is saved
asynchronously; Orbax writes into a temporary directory and renames it when the
save is committed, so a step directory that exists is complete. Because the
data position and the rng stream are functions of the step, the state is all a
run needs to continue exactly.

Resume order (DESIGN.md): the run's own newest checkpoint, then
`config.init_checkpoint` (params only), then scratch.
"""

import hashlib
import importlib.util
import json
import os
import re
import socket
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from codistill_jax import paths
from codistill_jax.errors import ConfigError
from codistill_jax.errors import StorageError

# Fields a run may change when it resumes: how it is watched and saved, and
# how its state is laid out over the devices (a checkpoint restores onto
# another mesh shape), but not what it computes.
RESUMABLE_FIELDS = ("log_every", "eval_every", "eval_max_batches",
                    "checkpoint_every", "keep_checkpoints", "sharding",
                    "microbatches", "noise_scale")


# How a filesystem refuses a write, as OSError or in tensorstore's messages
# (which wrap the OS error in a ValueError).
_REFUSALS = ("No space left on device", "Disk quota exceeded",
             "File too large", "Read-only file system", "Permission denied",
             "Not a directory")


def storage_error(what: str, path: str,
                  e: BaseException) -> StorageError | None:
  """A one-line StorageError if `e` is the storage refusing a write, else None.

  Args:
    what: what was being written, e.g. 'a checkpoint'.
    path: the directory it was written under.
    e: the error raised by the write (OSError, or Orbax's ValueError).
  """
  text = str(e)
  reason = next((r for r in _REFUSALS if r in text), None)
  if reason is None and isinstance(e, OSError) and e.strerror:
    reason = e.strerror
  if reason is None:
    return None
  return StorageError(
      f"cannot write {what} under {path}: {reason}; free space or point "
      "--workdir (and config.codistill.exchange_dir) at a writable "
      "filesystem, then rerun the same command: it resumes from the last "
      "committed checkpoint")


def multiprocessing_options(name: str) -> ocp.options.MultiprocessingOptions:
  """Orbax options for one of several managers of a (multi-process) job.

  Every group has its own managers, so their cross-process barriers get keys
  of their own (`name`, the same on every process), or one manager's
  barrier would be met by another's arrivals. In a multi-process job,
  naming the processes (all of them) makes Orbax use the coordination
  service's barriers rather than a device all-reduce: one issued from
  Orbax's commit thread could otherwise meet a train step's all-reduce in
  the CPU collectives (gloo) and abort both.
  """
  processes = (set(range(jax.process_count())) if jax.process_count() > 1
               else None)
  return ocp.options.MultiprocessingOptions(
      primary_host=0, active_processes=processes,
      barrier_sync_key_prefix=name)


def manager(directory: str, name: str, **options) -> ocp.CheckpointManager:
  """A CheckpointManager at `directory` (created), one of several in a job.

  Args:
    directory: local path, NFS or gs://.
    name: unique among the job's managers, e.g. 'state_g0'.
    **options: further `CheckpointManagerOptions`.
  """
  multiprocessing = multiprocessing_options(name)
  named = multiprocessing.active_processes is not None
  if named:  # Orbax leaves creating the directory to us then.
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=not named, multiprocessing_options=multiprocessing, **options))


@jax.jit
def checksum(tree: Any) -> jax.Array:
  """uint32 [n_leaves]: an exact checksum of each leaf's stored bits.

  Per leaf, the wrapping uint32 sum of its bit pattern (as 32-bit words)
  times an odd weight per position. Any single flipped bit changes it (an
  odd weight times a power of two is never 0 mod 2^32), swapped entries
  almost surely do, and integer sums come out the same under any sharding.
  Orbax stores arrays without a checksum of its own, so this is what catches
  bit rot and torn copies in own checkpoints and published params.
  """
  out = []
  for x in jax.tree.leaves(tree):
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
      x = x.astype(jnp.uint8)
    if x.dtype.itemsize % 4 == 0:
      words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:  # 8- and 16-bit types: widen their bit pattern to a word.
      unsigned = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
      words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    words = words.reshape(-1)
    odd = jnp.arange(words.size, dtype=jnp.uint32) * 2 + 1
    out.append(jnp.sum(words * odd, dtype=jnp.uint32))
  return jnp.stack(out) if out else jnp.zeros((0,), jnp.uint32)


def params_checksum(state: Any, sums: list[int]) -> list[int]:
  """The entries of `checksum(state)` (`sums`) that are of `state.params`,
  in the order `checksum(state.params)` gives them: what a reader of the
  params alone (init and teacher checkpoints) verifies."""
  paths_ = [p for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  return [s for p, s in zip(paths_, sums)
          if getattr(p[0], "name", getattr(p[0], "key", None)) == "params"]


def step_metadata(directory: str, step: int | None = None) -> dict:
  """The custom metadata Orbax committed with a step ({} if none).

  `directory` is a manager directory and `step` one of its steps, or (step
  None) a step directory itself.
  """
  step_dir = directory if step is None else os.path.join(directory, str(step))
  path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
  try:
    with epath.Path(path).open() as f:
      return json.load(f).get("custom_metadata") or {}
  except (OSError, ValueError):
    return {}


def run_identity(config: ml_collections.ConfigDict) -> str:
  """A readable, stable key of what a run computes, e.g.
  'flights-ctr_mlp-seed0-3fa9c2d1e4'.

  The config minus the fields that only change how a run is watched or where
  it exchanges (RESUMABLE_FIELDS, codistill.exchange_dir): the groups of one
  run, started as separate jobs, get the same key; another seed, model or
  setting gets another. Published params live under it (paths.run_dir).
  """
  d = _comparable(config)
  d.get("codistill", {}).pop("exchange_dir", None)
  digest = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
  short = lambda name: re.sub(r"\W", "_", str(name).rsplit(".", 1)[-1])
  return (f"{short(config.data.name)}-{short(config.model_name)}-"
          f"seed{config.seed}-{digest[:10]}")


def committed_steps(directory: str) -> list[int]:
  """Committed steps under an Orbax manager's directory ([] if none yet).

  Orbax writes a step into a temporary directory and renames it when the
  save commits, and lists committed steps only, so a reader never sees a
  partial save. Reads only: no manager, nothing created.
  """
  try:
    return sorted(ocp.step.checkpoint_steps(directory))
  except (FileNotFoundError, OSError):
    return []


class Corrupt(Exception):
  """A committed step that cannot be read back as it was written."""


def _first_line(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}" if str(
      e).strip() else type(e).__name__


def restore_state(directory: str, step: int, abstract_state: Any,
                  name: str = "restore") -> Any:
  """Restores a committed TrainState step onto `abstract_state`'s shardings.

  Reads only. Verifies the values against the checksum saved with the step
  (steps written before checksums existed are taken as they are).

  Args:
    directory: the manager directory (e.g. paths.checkpoints_dir).
    step: a committed step under it.
    abstract_state: ShapeDtypeStructs carrying the target shardings.
    name: tells this restore's Orbax barriers from other managers'.

  Raises:
    Corrupt: the step was damaged after it committed (unreadable metadata,
      a truncated or garbled array file, values that fail the checksum).
    ConfigError: the step is of another model or optimizer.
  """
  item = os.path.join(os.path.abspath(directory), str(step), "default")
  try:
    problem = mismatch(item, abstract_state)
  except Exception as e:  # pylint: disable=broad-except
    raise Corrupt(f"unreadable metadata ({_first_line(e)})") from None
  if problem:
    raise ConfigError(
        f"checkpoint {directory}/{step} does not match this config's "
        f"model/optimizer ({problem}); use a fresh --workdir")
  try:
    with ocp.StandardCheckpointer(
        multiprocessing_options=multiprocessing_options(name)) as ckptr:
      state = ckptr.restore(item, abstract_state)
  except Exception as e:  # pylint: disable=broad-except
    # The read boundary: Orbax and tensorstore raise anything from OSError
    # to a bare Exception for a truncated or garbled file.
    raise Corrupt(f"its arrays do not read back ({_first_line(e)})") from None
  saved = step_metadata(directory, step).get("checksum")
  if saved is not None and np.asarray(checksum(state)).tolist() != saved:
    raise Corrupt("its values do not match the checksum saved with them")
  return state


class Checkpointer:
  """An Orbax CheckpointManager for one group's own TrainState (writes)."""

  def __init__(self, directory: str, max_to_keep: int = 3,
               name: str = "state"):
    """`name`: tells this manager's Orbax barriers from other managers'."""
    self.directory = directory
    # cleanup_tmp_directories: saves a killed process left half-written
    # (never read: not committed) are deleted when the group restarts.
    self._mgr = manager(
        os.path.abspath(directory), name, max_to_keep=max_to_keep,
        enable_async_checkpointing=True, cleanup_tmp_directories=True)

  def save(self, step: int, state: Any, metadata: dict | None = None) -> None:
    """Starts an async save; returns once the arrays are copied off-device.

    `metadata` (JSON) commits atomically with the step. Also raises a
    failure of the previous save (Orbax waits for it first).
    """
    try:
      self._mgr.save(step, args=ocp.args.StandardSave(state), force=True,
                     custom_metadata=metadata)
    except (OSError, ValueError) as e:
      raise storage_error("a checkpoint", self.directory, e) or e

  def wait(self) -> None:
    try:
      self._mgr.wait_until_finished()
    except (OSError, ValueError) as e:
      raise storage_error("a checkpoint", self.directory, e) or e

  def close(self) -> None:
    self._mgr.close()


def saved_shapes(item_dir: str) -> dict[str, tuple[int, ...]]:
  """{'params.Dense_0.kernel': shape, ...} from a saved pytree's metadata."""
  if not epath.Path(item_dir).exists():  # Local, NFS or gs:// alike.
    raise FileNotFoundError(f"{item_dir} does not exist")
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(item_dir).item_metadata
  if meta is None:  # Orbax logs the read error and returns None.
    raise OSError(f"{item_dir}: unreadable metadata (partial or corrupt)")
  return {m.name: tuple(m.shape) for m in jax.tree.leaves(meta)
          if hasattr(m, "name")}


def mismatch(item_dir: str, abstract_tree: Any, prefix: str = "") -> str | None:
  """Describes the first difference between a checkpoint and a target tree.

  Reads only metadata, so an incompatible checkpoint (another architecture,
  another optimizer) is recognised before any array is read.
  """
  saved = saved_shapes(item_dir)
  want = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]:
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
            for k in path]
    want[".".join(([prefix] if prefix else []) + keys)] = tuple(leaf.shape)
  if prefix:
    saved = {k: v for k, v in saved.items() if k.startswith(prefix + ".")}
  for name in sorted(set(want) | set(saved)):
    if name not in saved:
      return f"{name} is missing from the checkpoint"
    if name not in want:
      return f"the checkpoint has {name}, which this model does not"
    if saved[name] != want[name]:
      return f"{name} has shape {saved[name]} there, {want[name]} here"
  return None


def find_step_dir(path: str, field: str = "config.init_checkpoint") -> str:
  """A run dir, a checkpoints dir or a step dir -> the newest committed step.

  `field` names the config field that gave `path`, in errors.
  """
  if "://" in path:  # os.path would read gs://b/run as ./gs:/b/run.
    raise ConfigError(f"{field}={path}: checkpoints are read from local or "
                      "NFS paths only (only config.codistill.exchange_dir "
                      "may be a bucket); copy the run there and point "
                      f"{field} at it")
  path = os.path.abspath(path)
  for candidate in (path, paths.checkpoints_dir(path, 0),
                    os.path.join(path, "checkpoints")):
    if os.path.isdir(candidate) and os.path.exists(
        os.path.join(candidate, "default")):
      return candidate
    if os.path.isdir(candidate):
      steps = [int(d) for d in os.listdir(candidate) if d.isdigit() and
               os.path.exists(os.path.join(candidate, d, "default"))]
      if steps:
        return os.path.join(candidate, str(max(steps)))
  raise ConfigError(f"{field}={path!r}: no committed checkpoint found there; "
                    "point it at a run's workdir or a step dir")


def run_config_of(path: str) -> dict | None:
  """The config.json of the run a checkpoint path belongs to, or None.

  `path` may be the run dir, a group's checkpoints dir or a step dir (as
  `find_step_dir` takes them); a bare step dir copied elsewhere has none.
  """
  path = os.path.abspath(path)
  for up in range(4):  # run / group_g/checkpoints / group_g/checkpoints/step
    candidate = paths.config_file(path)
    if os.path.isfile(candidate):
      try:
        with open(candidate) as f:
          return json.load(f)
      except (OSError, ValueError):
        return None
    if up < 3:
      path = os.path.dirname(path)
  return None


def restore_params(path: str, abstract_params: Any,
                   field: str = "config.init_checkpoint") -> Any:
  """Restores only the params of a TrainState checkpoint at `path`.

  Args:
    path: a run dir, checkpoints dir or step dir (see `find_step_dir`).
    abstract_params: ShapeDtypeStructs carrying the target shardings.
    field: the config field that gave `path`, named in errors (a
      checkpoint of another architecture is a ConfigError).
  """
  step_dir = find_step_dir(path, field)
  damaged = (f"{field}={path!r}: the checkpoint {step_dir} is unreadable or "
             "corrupt ({}); point it at another step or run")
  try:
    problem = mismatch(os.path.join(step_dir, "default"), abstract_params,
                       prefix="params")
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(damaged.format(_first_line(e))) from None
  if problem:
    raise ConfigError(f"{field}={path!r} holds another architecture "
                      f"({problem}); use a checkpoint of this model")
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                     dtype=x.dtype), abstract_params)
  try:
    with ocp.Checkpointer(
        ocp.PyTreeCheckpointHandler(),
        multiprocessing_options=multiprocessing_options("init_params")
    ) as ckptr:
      restored = ckptr.restore(
          os.path.join(step_dir, "default"),
          args=ocp.args.PyTreeRestore(
              item={"params": abstract_params},
              restore_args={"params": restore_args}, partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except
    # The read boundary: whatever Orbax or tensorstore raise.
    raise ConfigError(damaged.format(_first_line(e))) from None
  params = restored["params"]
  saved = step_metadata(step_dir).get("params_checksum")
  if saved is None:
    # Steps saved before params checksums existed: nothing to verify.
    logging.warning("%s=%s: step %s carries no params checksum (saved by an "
                    "older version); used unverified", field, path, step_dir)
  elif np.asarray(checksum(params)).tolist() != saved:
    raise ConfigError(damaged.format(
        "its params do not match the checksum saved with them"))
  return params


def _comparable(config: ml_collections.ConfigDict) -> dict:
  d = json.loads(config.to_json_best_effort())
  for k in RESUMABLE_FIELDS:
    d.pop(k, None)
  # A group that joins later brings its own fields (config.group.g<i>, i at
  # least num_groups): the run it joins is the same run.
  n = d.get("codistill", {}).get("num_groups", 1)
  table = d.get("group") or {}
  for key in list(table):
    if key[1:].isdigit() and int(key[1:]) >= n:
      del table[key]
  return d


def check_config(config: ml_collections.ConfigDict) -> None:
  """config.init_checkpoint, when set, exists (gs:// is checked on use)."""
  path = config.init_checkpoint
  if path and "://" not in path and not os.path.exists(path):
    raise ConfigError(f"config.init_checkpoint={path}: no such directory; "
                      "point it at a run's workdir or a step dir, or set ''")


def check_writable(path: str, field: str) -> None:
  """`path` is, or can be created as, a directory this job may write.

  Checked without writing, except a remote path (gs://, s3://), which is
  checked for the filesystem it needs and then probed (`check_remote`);
  `field` names the flag or config field in errors.
  """
  if "://" in path:
    if path.startswith("gs://") and importlib.util.find_spec("gcsfs") is None:
      raise ConfigError(f"{field}={path}: gs:// paths need the GCS "
                        "filesystem, which is not installed: "
                        "pip install -e .[gcs]")
    check_remote(path, field)
    return
  if os.path.islink(path) and not os.path.exists(path):
    raise StorageError(f"{field}={path} is a dangling symlink or a symlink "
                       f"loop; remove it or point {field} at a directory")
  # The nearest existing ancestor must be a directory this job may write
  # (access() sees a read-only filesystem even for root).
  probe = os.path.abspath(path)
  while not os.path.lexists(probe):
    probe = os.path.dirname(probe)
  reason = ("a dangling symlink or a symlink loop" if not os.path.exists(probe)
            else "Not a directory" if not os.path.isdir(probe)
            else None if os.access(probe, os.W_OK | os.X_OK)
            else f"{probe} is read-only or not writable")
  if reason:
    raise StorageError(
        f"{field}={path} cannot be written ({reason}); point {field} at a "
        "directory this job can create and write")


# How long a remote directory may take to answer the start-up probe. The
# stores' own retry schedules (tensorstore's: 32 tries, backing off to 32 s)
# would keep a job waiting for many minutes on a bucket it cannot reach.
REMOTE_PROBE_S = 20.0
_PROBE_RETRIES = {"max_retries": 3, "initial_delay": "0.5s",
                  "max_delay": "2s"}


def check_remote(path: str, field: str) -> None:
  """Refuses, in one line and within REMOTE_PROBE_S, a remote directory this
  job cannot write: a bucket that does not exist, one it may not write, an
  endpoint that does not answer.

  An object store has no directory to look at, and a listing of a missing
  bucket reads as empty, so the probe writes one empty object under `path`
  (`.probe-<host>-<pid>`) and deletes it: nothing is left behind.
  """
  key = f".probe-{socket.gethostname()}-{os.getpid()}"
  deadline = time.monotonic() + REMOTE_PROBE_S
  left = lambda: max(0.1, deadline - time.monotonic())
  try:
    kv = ts.KvStore.open(path.rstrip("/") + "/", context=ts.Context({
        "gcs_request_retries": _PROBE_RETRIES,
        "s3_request_retries": _PROBE_RETRIES})).result(timeout=left())
    kv.write(key, b"").result(timeout=left())
    kv.write(key, None).result(timeout=left())  # Deletes it.
  except TimeoutError:
    raise StorageError(
        f"{field}={path} did not answer within {REMOTE_PROBE_S:.0f} s; check "
        "the network, the credentials and the endpoint (an emulator's: "
        "TENSORSTORE_GCS_HTTP_URL, STORAGE_EMULATOR_HOST), or point "
        f"{field} at a local or NFS directory") from None
  except ValueError as e:
    text = str(e)
    if "NOT_FOUND" in text:
      fix = ("its bucket does not exist; create the bucket, or point "
             f"{field} at an existing one")
    elif "PERMISSION_DENIED" in text or "UNAUTHENTICATED" in text:
      fix = ("this job may not write there; give its credentials write "
             f"access, or point {field} at a bucket it may write")
    else:
      fix = (f"it cannot be reached ({_first_line(e)}); check the network, "
             f"the credentials and the endpoint, or point {field} at a local "
             "or NFS directory")
    raise StorageError(f"{field}={path}: {fix}") from None


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError if `workdir` holds a run of another config, or
  StorageError if it (or the exchange dir) cannot be created or written.

  Checked without writing anything (a remote exchange dir: see
  `check_remote`).
  """
  if "://" in workdir:
    raise ConfigError(f"--workdir={workdir}: the workdir must be a local or "
                      "NFS path (config, metrics and locks are plain files); "
                      "put config.codistill.exchange_dir on gs:// instead")
  check_writable(workdir, "--workdir")
  if config.codistill.exchange_dir:
    check_writable(config.codistill.exchange_dir,
                   "config.codistill.exchange_dir")
  path = paths.config_file(workdir)
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      old = json.load(f)
    if not isinstance(old, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    raise ConfigError(
        f"{path} (the run's identity) is unreadable ({_first_line(e)}); "
        "move it away and rerun the same command to resume this run's "
        "checkpoints with this config, or use a fresh --workdir") from None
  for k in RESUMABLE_FIELDS:
    old.pop(k, None)
  new = _comparable(config)
  if old != new:
    diff = sorted(diff_keys(old, new))
    raise ConfigError(
        f"--workdir={workdir} holds a run of another config (differs in "
        f"{', '.join(diff[:5])}); use a new --workdir or the run's own config")


def diff_keys(a, b, prefix=""):
  for k in set(a) | set(b):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      yield from diff_keys(va, vb, f"{prefix}{k}.")
    elif va != vb:
      yield f"{prefix}{k}"


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json atomically (tmp + rename): a run's first write.

  The groups of a run may be separate jobs starting together: each writes its
  own temporary file, so that one's rename never takes another's.
  """
  path = paths.config_file(workdir)
  tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, path)
  except OSError as e:
    raise StorageError(
        f"--workdir={workdir} cannot be written ({e.strerror or e}); point "
        "--workdir at a directory this job can create and write") from None

"""Own-state checkpoints (Orbax): save, resume, init-from, and run identity.

A group's whole `TrainState` (params, optimizer state, step, rng) is saved
asynchronously; Orbax writes into a temporary directory and renames it when the
save is committed, so a step directory that exists is complete. Because the
data position and the rng stream are functions of the step, the state is all a
run needs to continue exactly.

Resume order (DESIGN.md): the run's own newest checkpoint, then
`config.init_checkpoint` (params only), then scratch.
"""

import json
import os
from typing import Any

from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

from codistill_jax.errors import ConfigError

# Fields that may change between a run and its resumption: they change how a
# run is watched, not what it computes.
RESUMABLE_FIELDS = ("log_every", "eval_every", "checkpoint_every",
                    "keep_checkpoints")


class Checkpointer:
  """An Orbax CheckpointManager for one group's own TrainState."""

  def __init__(self, directory: str, max_to_keep: int = 3,
               multiprocessing_options=None):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=True, create=True,
        **({"multiprocessing_options": multiprocessing_options}
           if multiprocessing_options else {}))
    self.directory = directory
    self._mgr = ocp.CheckpointManager(os.path.abspath(directory),
                                      options=options)

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Starts an async save; returns once the arrays are copied off-device."""
    self._mgr.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores onto the shardings in `abstract_state` (ShapeDtypeStructs)."""
    problem = mismatch(os.path.join(self._mgr.directory, str(step),
                                    "default"), abstract_state)
    if problem:
      raise ConfigError(
          f"checkpoint {self.directory}/{step} does not match this config's "
          f"model/optimizer ({problem}); use a fresh --workdir")
    return self._mgr.restore(step,
                             args=ocp.args.StandardRestore(abstract_state))

  def wait(self) -> None:
    self._mgr.wait_until_finished()

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


def find_step_dir(path: str) -> str:
  """A run dir, a checkpoints dir or a step dir -> the newest committed step."""
  path = os.path.abspath(path)
  for candidate in (path, os.path.join(path, "group_0", "checkpoints"),
                    os.path.join(path, "checkpoints")):
    if os.path.isdir(candidate) and os.path.exists(
        os.path.join(candidate, "default")):
      return candidate
    if os.path.isdir(candidate):
      steps = [int(d) for d in os.listdir(candidate) if d.isdigit() and
               os.path.exists(os.path.join(candidate, d, "default"))]
      if steps:
        return os.path.join(candidate, str(max(steps)))
  raise ConfigError(f"config.init_checkpoint={path!r}: no committed checkpoint "
                    "found there; point it at a run's workdir or a step dir")


def restore_params(path: str, abstract_params: Any) -> Any:
  """Restores only the params of a TrainState checkpoint at `path`.

  `abstract_params` carries the target shardings; a checkpoint of another
  architecture gives a ConfigError naming the path.
  """
  step_dir = find_step_dir(path)
  problem = mismatch(os.path.join(step_dir, "default"), abstract_params,
                     prefix="params")
  if problem:
    raise ConfigError(f"config.init_checkpoint={path!r} holds another "
                      f"architecture ({problem}); use a checkpoint of the "
                      "same model")
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                     dtype=x.dtype), abstract_params)
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(
        os.path.join(step_dir, "default"),
        args=ocp.args.PyTreeRestore(
            item={"params": abstract_params},
            restore_args={"params": restore_args}, partial_restore=True))
  return restored["params"]


def _comparable(config: ml_collections.ConfigDict) -> dict:
  d = json.loads(config.to_json_best_effort())
  for k in RESUMABLE_FIELDS:
    d.pop(k, None)
  return d


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError if `workdir` holds a run of another config."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  for k in RESUMABLE_FIELDS:
    old.pop(k, None)
  new = _comparable(config)
  if old != new:
    diff = sorted(_diff_keys(old, new))
    raise ConfigError(
        f"--workdir={workdir} holds a run of another config (differs in "
        f"{', '.join(diff[:5])}); use a new --workdir or the run's own config")


def _diff_keys(a, b, prefix=""):
  for k in set(a) | set(b):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      yield from _diff_keys(va, vb, f"{prefix}{k}.")
    elif va != vb:
      yield f"{prefix}{k}"


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json atomically (tmp + rename)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(path + ".tmp", path)

"""Parameter exchange between groups through checkpoints on shared storage.

Each group publishes its params every `exchange_every` steps as an Orbax
checkpoint under `<exchange_dir>/runs/<run>/group_<g>/published/<step>`
(`paths.py`), with the run's identity committed in the step's metadata and an
exact checksum of the params beside them. Orbax writes a step into a
temporary directory and renames it when committed, and
`ocp.step.checkpoint_steps` lists committed steps only, so a reader never sees
a partial save; it accepts only steps of its own run, and a publisher's
`max_to_keep` deletes only in its own run's folder, so many runs can share one
exchange root. Any path tensorstore understands works: local disk, NFS,
`gs://`.

`PeerReader` keeps, for each peer, the params of its newest committed step,
restored straight onto the reading group's own sub-mesh. Restores run on a
background thread so the training loop only blocks to stack finished ones.
A peer whose newest step vanishes (deleted by `max_to_keep`) is retried; one
that is partial, corrupt or of another architecture keeps its previous params,
and the reason is logged and counted.
"""

import concurrent.futures
import dataclasses
import os
import threading
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from codistill_jax import checkpoint as ckpt_lib
from codistill_jax import paths
from codistill_jax import step as step_lib


class Publisher:
  """Publishes one group's params (Orbax, `max_to_keep` >= 3).

  In a single-process job the save runs on a background thread, on a device
  copy of the params (the live ones are donated to the next step), so the
  training loop only pays for dispatching the copy. A multi-process group
  saves from the main thread: Orbax synchronises the processes there.
  """

  def __init__(self, run_dir: str, group: int, run: str = "",
               max_to_keep: int = 3):
    """Args:

      run_dir: the run's folder under the exchange root (`paths.run_dir`).
      group: the publishing group.
      run: the run's identity, committed with every step.
      max_to_keep: committed steps kept (>= 3: readers never race).
    """
    self._background = jax.process_count() == 1
    self._run = run
    self._mgr = ckpt_lib.manager(
        paths.published_dir(run_dir, group), f"publish_g{group}",
        max_to_keep=max_to_keep,
        # A killed predecessor's half-written saves go at restart.
        cleanup_tmp_directories=True,
        enable_async_checkpointing=not self._background)
    self._pool = concurrent.futures.ThreadPoolExecutor(1)
    self._future = None
    self.skipped = 0  # Publishes skipped because a save was still running.
    # Steps committed before this process started. A group restarted from an
    # older checkpoint (after a crash) replays steps it had published: those
    # stay as committed (peers may hold them) and the replay's are not saved.
    self._earlier = set(self._mgr.all_steps())

  def _save(self, step: int, item: Any) -> None:
    try:
      self._mgr.save(step, args=ocp.args.StandardSave(item), force=True,
                     custom_metadata={"run": self._run})
    except (OSError, ValueError) as e:
      raise ckpt_lib.storage_error(f"published params of step {step}",
                                   str(self._mgr.directory), e) or e

  def publish(self, step: int, params: Any, if_idle: bool = False) -> bool:
    """Publishes `params` as `step`; returns False if it skipped.

    Args:
      step: the step the params are of.
      params: the group's params (not modified; safe to donate afterwards).
      if_idle: skip instead of waiting when the previous save is still being
        written (on a saturated host a save can outlast the exchange
        interval; peers then keep a slightly staler teacher rather than the
        training loop stalling).
    """
    if step in self._earlier:  # Replayed after a restart: already committed.
      return False
    if not self._background:
      copy, sums = _copy_with_checksum(params)
      self._save(step, {"params": copy, "checksum": sums})
      return True
    if self._future is not None:
      if if_idle and not self._future.done():
        self.skipped += 1
        return False
      self._future.result()  # Also re-raises an error of the previous save.
    # One dispatch: a device copy (the live params are donated to the next
    # step) and its checksum; the save itself runs on the background thread.
    copy, sums = _copy_with_checksum(params)
    self._future = self._pool.submit(
        self._save, step, {"params": copy, "checksum": sums})
    return True

  def wait(self) -> None:
    if self._future is not None:
      self._future.result()
    try:
      self._mgr.wait_until_finished()
    except (OSError, ValueError) as e:
      raise ckpt_lib.storage_error("published params",
                                   str(self._mgr.directory), e) or e

  def close(self) -> None:
    self.wait()
    self._pool.shutdown()
    self._mgr.close()


@jax.jit
def _copy_with_checksum(params):
  return jax.tree.map(jnp.copy, params), ckpt_lib.checksum(params)


def warm_up(params: Any) -> None:
  """Compiles a publish's copy and checksum before the loop (not on its
  clock); writes nothing."""
  jax.block_until_ready(_copy_with_checksum(params))


def teachers_sharding(param_shardings: Any) -> step_lib.Teachers:
  """Layout of stacked peer params: unsplit teacher axis, then as the params.

  `PeerReader` stacks onto it; `compile_check` compiles the step for it.
  """
  mesh = jax.tree.leaves(param_shardings)[0].mesh
  return step_lib.Teachers(
      params=jax.tree.map(
          lambda s: jax.sharding.NamedSharding(
              mesh, jax.sharding.PartitionSpec(None, *s.spec)),
          param_shardings),
      weights=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _group_broadcast(mesh: jax.sharding.Mesh) -> Callable:
  """values -> the first process's values, on every process of `mesh`.

  A collective over the group's own devices, ordered after the group's
  train steps on each of them. A job-wide one
  (`multihost_utils.broadcast_one_to_all`) would run beside the other
  groups' steps on their devices and, with the CPU collectives (gloo),
  meet their all-reduces and abort.
  """
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(mesh.axis_names))
  first = jax.jit(lambda x: x[0], out_shardings=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  local = len(mesh.local_devices)

  def broadcast(values: np.ndarray) -> np.ndarray:
    rows = np.broadcast_to(values, (local, *values.shape))
    return np.asarray(first(jax.make_array_from_process_local_data(
        sharding, rows)))

  return broadcast


@dataclasses.dataclass
class PeerSlot:
  group: int
  step: int | None = None  # Step of the params held; None = nothing yet.
  params: Any = None
  failures: int = 0  # Restores that failed and kept the previous params.
  last_error: str = ""


class PeerReader:
  """The newest committed params of each peer, on the reader's sharding."""

  def __init__(self, run_dir: str, peers: list[int], abstract_params: Any,
               teacher_dtype: Any = jnp.float32, retries: int = 3,
               run: str = ""):
    """Args:

      run_dir: the run's folder under the exchange root (`paths.run_dir`).
      peers: the groups to read.
      abstract_params: ShapeDtypeStructs with the reader's shardings.
      teacher_dtype: float params are stacked in this dtype.
      retries: tries when a newest step vanishes while being read.
      run: the run's identity; a step committed by another run is refused.
    """
    self.run_dir, self.run = run_dir, run
    self.slots = [PeerSlot(g) for g in peers]
    self._abstract = abstract_params
    n_leaves = len(jax.tree.leaves(abstract_params))
    mesh = jax.tree.leaves(abstract_params)[0].sharding.mesh
    self._abstract_item = {
        "params": abstract_params,
        "checksum": jax.ShapeDtypeStruct(
            (n_leaves,), jnp.uint32,
            sharding=jax.sharding.NamedSharding(
                mesh, jax.sharding.PartitionSpec()))}
    self._retries = retries
    self._dtype = jnp.dtype(teacher_dtype)
    self._restore_options = ckpt_lib.multiprocessing_options(
        "read_" + "_".join(str(g) for g in peers))
    self._agree = _group_broadcast(mesh)
    self._lock = threading.Lock()
    self._pool = concurrent.futures.ThreadPoolExecutor(1)
    self._future = None
    shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
    stacked_sharding = teachers_sharding(shardings)
    dtype = self._dtype

    def stack(weights, *trees):
      cast = lambda x: (x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x)
      params = jax.tree.map(lambda *xs: jnp.stack([cast(x) for x in xs]),
                            *trees)
      return step_lib.Teachers(params, weights)

    self._stack = jax.jit(stack, out_shardings=stacked_sharding)
    self.sharding = stacked_sharding
    self._zeros = jax.jit(
        lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                             abstract_params),
        out_shardings=shardings)
    self._teachers = None
    jax.block_until_ready(self.teachers())  # Compile stacking up front.

  # -- Restoring (background thread). --------------------------------------
  def _restore_one(self, slot: PeerSlot, only_step: int | None = None):
    directory = paths.published_dir(self.run_dir, slot.group)
    for attempt in range(self._retries):
      steps = ([only_step] if only_step is not None else
               ckpt_lib.committed_steps(directory))
      if not steps or (slot.step is not None and steps[-1] <= slot.step):
        return  # Nothing new.
      step = steps[-1]
      item = os.path.join(directory, str(step), "default")
      try:
        writer = ckpt_lib.step_metadata(directory, step).get("run")
        if self.run and writer != self.run:
          raise ValueError(f"written by another run ({writer!r})")
        problem = (ckpt_lib.mismatch(item, self._abstract, prefix="params") or
                   ckpt_lib.mismatch(item, self._abstract_item))
        if problem:
          raise ValueError(f"another architecture: {problem}")
        with ocp.StandardCheckpointer(
            multiprocessing_options=self._restore_options) as ckptr:
          restored = ckptr.restore(item, self._abstract_item)
        params = restored["params"]
        if not np.array_equal(np.asarray(restored["checksum"]),
                              np.asarray(ckpt_lib.checksum(params))):
          raise ValueError("corrupt: restored values do not match the "
                           "checksum published with them")
      except FileNotFoundError as e:
        if only_step is not None:  # Agreed step gone: wait for the next one.
          return
        # max_to_keep deleted the step while we read it: look again.
        logging.info("peer %d step %d vanished (%s); retry %d", slot.group,
                     step, e, attempt + 1)
        continue
      except Exception as e:  # pylint: disable=broad-except
        # Partial, corrupt or incompatible: keep the previous teacher.
        with self._lock:
          slot.failures += 1
          slot.last_error = f"step {step}: {type(e).__name__}: {e}"[:300]
        logging.warning("peer %d: keeping step %s, could not restore step %d:"
                        " %s", slot.group, slot.step, step, slot.last_error)
        return
      with self._lock:
        slot.step, slot.params = step, params
      return
    with self._lock:  # Every newest step vanished under us: try next time.
      slot.last_error = f"newest steps vanished during {self._retries} tries"

  def _restore_all(self) -> None:
    for slot in self.slots:
      self._restore_one(slot)

  def _restore_agreed(self) -> None:
    """Multi-process group: every process restores the same steps, together.

    Orbax restores of arrays that span processes synchronise the processes,
    so they run in the main thread at the same point of the loop, and the
    first process's view of the newest committed steps is broadcast so that
    all agree.
    """
    listed = [ckpt_lib.committed_steps(paths.published_dir(
        self.run_dir, s.group)) or [-1] for s in self.slots]
    newest = self._agree(np.array([steps[-1] for steps in listed], np.int32))
    for slot, step in zip(self.slots, newest.tolist()):
      if step >= 0 and (slot.step is None or step > slot.step):
        self._restore_one(slot, only_step=int(step))

  def start_refresh(self) -> None:
    """Starts restoring every peer's newest step, unless one is running."""
    if jax.process_count() > 1:
      self._restore_agreed()
      return
    if self._future is None or self._future.done():
      if self._future is not None:
        self._future.result()  # Re-raise unexpected errors of the last one.
      self._future = self._pool.submit(self._restore_all)

  def refresh(self, block: bool = False) -> None:
    self.start_refresh()
    if block and self._future is not None:
      self._future.result()

  # -- What the train step consumes. ---------------------------------------
  def teachers(self) -> step_lib.Teachers:
    """Stacked params of the peers held now; weight 0 where none yet."""
    with self._lock:
      held = [(s.step, s.params) for s in self.slots]
    key = tuple(step for step, _ in held)
    if self._teachers is None or self._teachers[0] != key:
      trees = [p if p is not None else self._zeros() for _, p in held]
      weights = np.array([p is not None for _, p in held], np.float32)
      self._teachers = (key, self._stack(weights, *trees))
    return self._teachers[1]

  def held_steps(self) -> dict[int, int | None]:
    """{peer: the step of the params held (None: nothing yet)}."""
    with self._lock:
      return {s.group: s.step for s in self.slots}

  def staleness(self, own_step: int) -> dict[str, float]:
    """Now: own_step minus each held peer step, and the failures."""
    out = {f"staleness/group_{g}": own_step - step
           for g, step in self.held_steps().items() if step is not None}
    return {**out, **self.failures()}

  def failures(self) -> dict[str, float]:
    """Restores that failed (and kept the previous params), per peer."""
    with self._lock:
      return {f"restore_failures/group_{s.group}": s.failures
              for s in self.slots}

  def close(self) -> None:
    if self._future is not None:
      self._future.result()
    self._pool.shutdown()

"""Parameter exchange between groups through files on shared storage.

Every `exchange_every` steps a group publishes its params under
`<exchange_dir>/runs/<run>/group_<g>/published/` (`paths.py`) and its peers
reload the newest committed step. Any path tensorstore understands works:
local disk, NFS, `gs://`. Two formats, read alike:

  `<step>.params`  one object per step: a header (run identity, the leaves'
      paths, dtypes and shapes, a crc32 of the payload) and the raw bytes of
      every leaf. Written by groups whose process holds every param (single
      process jobs) with one tensorstore key write, which commits atomically
      (a temporary key renamed into place on a filesystem; an object put on
      GCS), so "committed" is "the key is listed". About what moving the
      bytes costs: no per-leaf metadata, no thread or event loop per call.
  `<step>/`        an Orbax checkpoint of {'params', 'checksum'}, with the run
      identity in its committed metadata. Written by groups that span
      processes (Orbax synchronises their writes); committed when Orbax's
      rename (or, on GCS, commit marker) is there.

A reader accepts only steps of its own run; a publisher's `max_to_keep`
deletes only in its own run's folder, so many runs can share one root.
`PeerReader` keeps, for each peer, the params of its newest committed step,
restored straight onto the reading group's own sub-mesh, on a background
thread so the loop only blocks to stack finished ones. A peer whose newest
step vanishes (deleted by `max_to_keep`) is retried; one that is partial,
corrupt or of another architecture keeps its previous params, and the reason
is logged and counted. Both sides count the CPU time of their own threads
and the bytes they move (`cost()`), which the trainer logs.
"""

import concurrent.futures
import dataclasses
import json
import os
import re
import threading
import time
import zlib
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from codistill_jax import checkpoint as ckpt_lib
from codistill_jax import paths
from codistill_jax import step as step_lib

MAGIC = b"CDXP0001"  # Format and version of a `<step>.params` object.
_BLOB = re.compile(r"^(\d+)\.params$")
_ORBAX_LOCAL = re.compile(r"^(\d+)/")  # A renamed (committed) step dir.
_ORBAX_REMOTE = re.compile(r"^(\d+)/commit_success\.txt$")


def kvstore(directory: str) -> ts.KvStore:
  """A tensorstore key-value store rooted at `directory` (local or gs://)."""
  url = (directory.rstrip("/") + "/" if "://" in directory else
         "file://" + os.path.abspath(directory) + "/")
  return ts.KvStore.open(url).result()


def list_steps(kv: ts.KvStore, remote: bool) -> dict[int, str]:
  """{committed step: 'blob' | 'orbax'} under a published dir (one listing)."""
  out = {}
  for key in kv.list().result():
    key = key.decode()
    m = _BLOB.match(key)
    if m:
      out[int(m.group(1))] = "blob"
      continue
    m = (_ORBAX_REMOTE if remote else _ORBAX_LOCAL).match(key)
    if m:
      out.setdefault(int(m.group(1)), "orbax")
  return out


def published_steps(directory: str) -> list[int]:
  """Committed steps, of either format, in a published dir ([] if none)."""
  remote = "://" in directory
  if not remote and not os.path.isdir(directory):
    return []
  return sorted(list_steps(kvstore(directory), remote))


# ----------------------------------------------------------------------------
# The run's manifest: one `member.json` per group (paths.member_key).
# ----------------------------------------------------------------------------
def write_member(run_dir: str, group: int, record: dict) -> None:
  """Writes (or replaces, whole) group `group`'s manifest entry."""
  kvstore(run_dir).write(paths.member_key(group),
                         json.dumps({"group": group, **record})).result()


def read_members(run_dir: str) -> dict[int, dict]:
  """{group: its manifest entry} of every group that ever published in the
  run ({} if none yet); an unreadable entry is skipped (read next time)."""
  remote = "://" in run_dir
  if not remote and not os.path.isdir(run_dir):
    return {}
  kv = kvstore(run_dir)
  try:
    keys = [k.decode() if isinstance(k, bytes) else k
            for k in kv.list(ts.KvStore.KeyRange(
                inclusive_min="group_", exclusive_max="group`")).result()]
  except ValueError:
    return {}
  out = {}
  for key in keys:
    m = re.fullmatch(r"group_(\d+)/" + re.escape(paths.MEMBER_FILE), key)
    if not m:
      continue
    try:
      got = kv.read(key).result()
      if got.state == "value":
        out[int(m.group(1))] = json.loads(got.value)
    except ValueError:  # Being replaced, or damaged: next time.
      continue
  return out


def encode(params: Any, run: str, meta: dict | None = None) -> bytes:
  """The `<step>.params` object of a tree of host arrays (`meta`: what the
  publisher says about them, e.g. its newest validation loss)."""
  entries, leaves, offset = [], [], 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    a = np.ascontiguousarray(x)
    entries.append({"path": jax.tree_util.keystr(path), "dtype": a.dtype.str,
                    "shape": list(a.shape), "offset": offset})
    leaves.append(a)
    offset += a.nbytes
  payload = np.empty(offset, np.uint8)
  for e, a in zip(entries, leaves):
    payload[e["offset"]:e["offset"] + a.nbytes] = a.reshape(-1).view(np.uint8)
  header = json.dumps({"run": run, "leaves": entries, "nbytes": offset,
                       "crc32": zlib.crc32(payload),
                       **({"meta": meta} if meta else {})}).encode()
  return b"".join([MAGIC, len(header).to_bytes(8, "little"), header,
                   payload.data])


def decode(value: bytes) -> tuple[dict, dict[str, np.ndarray]]:
  """(header, {leaf path: array view}) of a `<step>.params` object.

  Raises ValueError for anything but a whole, intact object.
  """
  if value[:8] != MAGIC:
    raise ValueError("not a published params object (bad magic)")
  n = int.from_bytes(value[8:16], "little")
  header = json.loads(value[16:16 + n])
  start = 16 + n
  if len(value) - start != header["nbytes"]:
    raise ValueError(f"partial: {len(value) - start} of {header['nbytes']} "
                     "payload bytes")
  if zlib.crc32(memoryview(value)[start:]) != header["crc32"]:
    raise ValueError("corrupt: the payload does not match its crc32")
  return header, {e["path"]: np.frombuffer(
      value, np.dtype(e["dtype"]), int(np.prod(e["shape"], dtype=np.int64)),
      start + e["offset"]).reshape(e["shape"]) for e in header["leaves"]}


@dataclasses.dataclass
class Cost:
  """What an exchange side spent: CPU of its own threads, bytes, calls."""
  cpu_s: float = 0.0
  bytes: int = 0
  calls: int = 0

  def add(self, cpu_s: float, nbytes: int) -> None:
    self.cpu_s, self.bytes, self.calls = (self.cpu_s + cpu_s,
                                          self.bytes + nbytes, self.calls + 1)


FORMATS = ("auto", "blob", "orbax")


class Publisher:
  """Publishes one group's params (`max_to_keep` >= 3 steps kept).

  In a single-process job the save runs on a background thread, on a device
  copy of the params (the live ones are donated to the next step), as one
  `<step>.params` object; the training loop only pays for dispatching the
  copy. A multi-process group saves an Orbax checkpoint from the main thread:
  Orbax synchronises the processes there.
  """

  def __init__(self, run_dir: str, group: int, run: str = "",
               max_to_keep: int = 3, fmt: str | None = None):
    """Args:

      run_dir: the run's folder under the exchange root (`paths.run_dir`).
      group: the publishing group.
      run: the run's identity, committed with every step.
      max_to_keep: committed steps kept (>= 3: readers never race).
      fmt: 'blob', 'orbax' or 'auto'/None (blob in a single-process job).
    """
    if fmt in (None, "auto"):
      fmt = "blob" if jax.process_count() == 1 else "orbax"
    if fmt == "blob" and jax.process_count() > 1:
      raise ValueError("fmt='blob' needs every param in this process; a "
                       "multi-process group publishes with 'orbax'")
    self.fmt = fmt
    self._background = jax.process_count() == 1
    self._run, self._keep = run, max_to_keep
    self.directory = paths.published_dir(run_dir, group)
    if self.fmt == "blob":
      if "://" not in self.directory:
        os.makedirs(self.directory, exist_ok=True)
        # A killed predecessor's half-written object (never listed) goes.
        for name in os.listdir(self.directory):
          if name.endswith(".params.__lock"):
            os.remove(os.path.join(self.directory, name))
      self._kv = kvstore(self.directory)
      listed = list_steps(self._kv, "://" in self.directory)
    else:
      self._mgr = ckpt_lib.manager(
          self.directory, f"publish_g{group}", max_to_keep=max_to_keep,
          # A killed predecessor's half-written saves go at restart.
          cleanup_tmp_directories=True,
          enable_async_checkpointing=not self._background)
      listed = dict.fromkeys(self._mgr.all_steps(), "orbax")
    self._pool = concurrent.futures.ThreadPoolExecutor(1)
    self._future = None
    self.skipped = 0  # Publishes skipped because a save was still running.
    self.cost = Cost()
    # Steps committed before this process started. A group restarted from an
    # older checkpoint (after a crash) replays steps it had published: those
    # stay as committed (peers may hold them) and the replay's are not saved.
    self._earlier = set(listed)
    self._mine = sorted(listed)  # Kept steps, oldest first (max_to_keep).

  def _save_blob(self, step: int, copy: Any, meta: dict) -> None:
    t = time.thread_time()
    data = encode(jax.device_get(copy), self._run, meta)
    self._kv.write(f"{step}.params", data).result()
    self._mine.append(step)
    while len(self._mine) > self._keep:  # Only ever this run's own steps.
      old = self._mine.pop(0)
      self._kv.delete_range(ts.KvStore.KeyRange(
          inclusive_min=f"{old}.params", exclusive_max=f"{old}.params\x00")
                           ).result()
    self.cost.add(time.thread_time() - t, len(data))

  def _save_orbax(self, step: int, copy: Any, sums: Any, meta: dict) -> None:
    t = time.thread_time()
    self._mgr.save(step, args=ocp.args.StandardSave(
        {"params": copy, "checksum": sums}), force=True,
                   custom_metadata={"run": self._run, "meta": meta})
    self.cost.add(time.thread_time() - t, sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(copy)))

  def _save(self, step: int, *item) -> None:
    try:
      (self._save_blob if self.fmt == "blob" else self._save_orbax)(step,
                                                                    *item)
    except (OSError, ValueError) as e:
      raise ckpt_lib.storage_error(f"published params of step {step}",
                                   self.directory, e) or e

  def publish(self, step: int, params: Any, if_idle: bool = False,
              meta: dict | None = None) -> bool:
    """Publishes `params` as `step`; returns False if it skipped.

    Args:
      step: the step the params are of.
      params: the group's params (not modified; safe to donate afterwards).
      if_idle: skip instead of waiting when the previous save is still being
        written (on a saturated host a save can outlast the exchange
        interval; peers then keep a slightly staler teacher rather than the
        training loop stalling).
      meta: small JSON-able facts committed with the step (`PeerReader.meta`).
    """
    if step in self._earlier:  # Replayed after a restart: already committed.
      return False
    if self._future is not None:
      if if_idle and not self._future.done():
        self.skipped += 1
        return False
      self._future.result()  # Also re-raises an error of the previous save.
    # One dispatch: a device copy (the live params are donated to the next
    # step), and for Orbax its checksum; the save runs in the background.
    item = ((_copy(params),) if self.fmt == "blob" else
            _copy_with_checksum(params)) + (dict(meta or {}),)
    if not self._background:
      self._save(step, *item)
    else:
      self._future = self._pool.submit(self._save, step, *item)
    return True

  def wait(self) -> None:
    if self._future is not None:
      self._future.result()
    if self.fmt == "orbax":
      try:
        self._mgr.wait_until_finished()
      except (OSError, ValueError) as e:
        raise ckpt_lib.storage_error("published params", self.directory,
                                     e) or e

  def close(self) -> None:
    self.wait()
    self._pool.shutdown()
    if self.fmt == "orbax":
      self._mgr.close()


@jax.jit
def _copy(params):
  return jax.tree.map(jnp.copy, params)


@jax.jit
def _copy_with_checksum(params):
  return jax.tree.map(jnp.copy, params), ckpt_lib.checksum(params)


def warm_up(params: Any) -> None:
  """Compiles a publish's copy (and checksum) before the loop (not on its
  clock); writes nothing."""
  jax.block_until_ready((_copy(params), _copy_with_checksum(params)))


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
  kv: Any = None  # The peer's published dir as a key-value store.
  meta: dict = dataclasses.field(default_factory=dict)  # Of the step held.


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
    self._remote = "://" in run_dir
    self.slots = [PeerSlot(g) for g in peers]
    self._abstract = abstract_params
    self._leaves = [(jax.tree_util.keystr(path), a) for path, a in
                    jax.tree_util.tree_flatten_with_path(abstract_params)[0]]
    self._treedef = jax.tree.structure(abstract_params)
    n_leaves = len(self._leaves)
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
    self._got_meta: dict = {}  # Of the step being restored (one thread).
    self.cost = Cost()
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
  def _listing(self, slot: PeerSlot) -> dict[int, str]:
    directory = paths.published_dir(self.run_dir, slot.group)
    if slot.kv is None:
      if not self._remote and not os.path.isdir(directory):
        return {}  # Nothing published yet (and nothing created here).
      slot.kv = kvstore(directory)
    try:
      return list_steps(slot.kv, self._remote)
    except ValueError:  # Not there (yet), or unreachable: nothing new.
      return {}

  def _read_blob(self, slot: PeerSlot, step: int) -> tuple[Any, int] | None:
    """(params on our shardings, bytes), or None if the step vanished."""
    result = slot.kv.read(f"{step}.params").result()
    if result.state != "value":
      return None
    header, arrays = decode(result.value)
    if self.run and header.get("run") != self.run:
      raise ValueError(f"written by another run ({header.get('run')!r})")
    self._got_meta = header.get("meta") or {}
    extra = sorted(set(arrays) - {path for path, _ in self._leaves})
    if extra:
      raise ValueError(f"another architecture: it has {extra[0]}, which "
                       "this model does not")
    out = []
    for path, a in self._leaves:
      host = arrays.get(path)
      if host is None or tuple(host.shape) != tuple(a.shape):
        raise ValueError(f"another architecture: {path} is "
                         f"{None if host is None else tuple(host.shape)} "
                         f"there, {tuple(a.shape)} here")
      host = host.astype(a.dtype, copy=False)
      out.append(jax.make_array_from_callback(a.shape, a.sharding,
                                              lambda idx, h=host: h[idx]))
    return jax.tree.unflatten(self._treedef, out), len(result.value)

  def _read_orbax(self, slot: PeerSlot, step: int) -> tuple[Any, int]:
    directory = paths.published_dir(self.run_dir, slot.group)
    metadata = ckpt_lib.step_metadata(directory, step)
    writer = metadata.get("run")
    if self.run and writer != self.run:
      raise ValueError(f"written by another run ({writer!r})")
    self._got_meta = metadata.get("meta") or {}
    item = os.path.join(directory, str(step), "default")
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
      raise ValueError("corrupt: restored values do not match the checksum "
                       "published with them")
    return params, sum(x.size * x.dtype.itemsize
                       for x in jax.tree.leaves(params))

  def _restore_one(self, slot: PeerSlot, only_step: int | None = None):
    for attempt in range(self._retries):
      listed = self._listing(slot)
      steps = [only_step] if only_step is not None else sorted(listed)
      if not steps or (slot.step is not None and steps[-1] <= slot.step):
        return  # Nothing new.
      step = steps[-1]
      t = time.thread_time()
      try:
        if listed.get(step, "blob") == "blob":
          got = self._read_blob(slot, step)
          if got is None:
            raise FileNotFoundError(f"{step}.params")
        else:
          got = self._read_orbax(slot, step)
        params, nbytes = got
      except FileNotFoundError as e:
        if only_step is not None:  # Agreed step gone: wait for the next one.
          return
        # max_to_keep deleted the step while we read it: look again.
        logging.info("peer %d step %d vanished (%s); retry %d", slot.group,
                     step, e, attempt + 1)
        continue
      except Exception as e:  # pylint: disable=broad-except
        if step not in self._listing(slot):
          # Deleted while read, mid-way (an Orbax step's metadata gone
          # first reads as another run's): look again, as above.
          if only_step is not None:
            return
          logging.info("peer %d step %d vanished (%s); retry %d", slot.group,
                       step, e, attempt + 1)
          continue
        # Partial, corrupt or incompatible: keep the previous teacher.
        with self._lock:
          slot.failures += 1
          slot.last_error = f"step {step}: {type(e).__name__}: {e}"[:300]
        logging.warning("peer %d: keeping step %s, could not restore step %d:"
                        " %s", slot.group, slot.step, step, slot.last_error)
        return
      self.cost.add(time.thread_time() - t, nbytes)
      with self._lock:
        slot.step, slot.params, slot.meta = step, params, self._got_meta
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
    newest = self._agree(np.array(
        [max(self._listing(s), default=-1) for s in self.slots], np.int32))
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

  def restore_at(self, step: int) -> None:
    """Restores every peer's params of `step` itself, in this thread (a peer
    that has not committed it keeps what it held: see `held_steps`)."""
    if self._future is not None:
      self._future.result()
    for slot in self.slots:
      self._restore_one(slot, only_step=step)

  # -- What the train step consumes. ---------------------------------------
  def teachers(self) -> step_lib.Teachers:
    """Stacked params of the peers held now; weight 0 where none yet."""
    return self.snapshot()[0]

  def snapshot(self) -> tuple[step_lib.Teachers, dict[int, int | None]]:
    """(`teachers()`, `held_steps()`) of one moment: a background restore
    cannot land between the two."""
    with self._lock:
      held = [(s.group, s.step, s.params) for s in self.slots]
    key = tuple(step for _, step, _ in held)
    if self._teachers is None or self._teachers[0] != key:
      trees = [p if p is not None else self._zeros() for _, _, p in held]
      weights = np.array([p is not None for _, _, p in held], np.float32)
      self._teachers = (key, self._stack(weights, *trees))
    return self._teachers[1], {g: step for g, step, _ in held}

  def meta(self, group: int) -> dict:
    """What peer `group` published with the params held ({} if none)."""
    with self._lock:
      return next(dict(s.meta) for s in self.slots if s.group == group)

  def held_steps(self) -> dict[int, int | None]:
    """{peer: the step of the params held (None: nothing yet)}."""
    with self._lock:
      return {s.group: s.step for s in self.slots}

  def newest_published(self) -> dict[int, int]:
    """{peer: its newest committed step (-1: none)} (one listing each)."""
    return {s.group: max(self._listing(s), default=-1) for s in self.slots}

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

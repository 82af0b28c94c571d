"""The job's one owner of what it writes: checkpoints, published params, stops.

A job holds several Orbax managers: per group it drives, one for its own
TrainState (`checkpoint.Checkpointer`) and, when it codistils, one for the
params it publishes to its peers (`exchange.Publisher`). The rules that keep
them from deadlocking a multi-process job, and runs from trampling each
other, live here and nowhere else:

  * Every manager has barrier keys of its own (its name), so one manager's
    cross-process barrier is never met by another's arrivals.
  * In a multi-process job two managers' finalizers must not interleave
    their barriers: before a group saves its own state it waits for its
    publisher, and before it publishes it waits for its own save.
  * In a multi-process job SIGTERM is JAX's: a Python handler would replace
    its preemption notifier and the agreed stop step would never come, so
    `Preemption` asks JAX's sync point there and keeps a handler only in a
    single process. Ctrl-C (SIGINT) takes the same path as SIGTERM.
  * Run identity: a run publishes under `EXCHANGE_DIR/runs/<run>/`
    (`checkpoint.run_identity`), commits its identity with every step and
    only ever lists or deletes there, so many runs can share one root.
  * One writer per group: `WriterLock` (`WORKDIR/group_<g>/writer.lock`).
  * Own checkpoints carry an exact checksum; a corrupt newest step is
    skipped (and moved aside) and the run resumes from the one before.

The loop says `save`, `publish`, `should_stop`; it never branches on the
process count. Reads (which step to resume, restoring it) write nothing, so
set-up can fail on bad input and leave the workdir as it was; locks and
managers are taken by `open()`, after set-up has checked everything.
"""

import datetime
import errno
import json
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from codistill_jax import checkpoint as ckpt_lib
from codistill_jax import exchange
from codistill_jax import paths
from codistill_jax.errors import ConfigError
from codistill_jax.errors import StorageError


class Storage:
  """The checkpoints and published params of the groups this job drives."""

  def __init__(self, workdir: str, exchange_dir: str, groups: list[int],
               keep: int = 3, run: str = "", primary: bool = True):
    """Nothing is created or written here.

    Args:
      workdir: the run directory (paths.py gives its layout).
      exchange_dir: the exchange root the run's groups share.
      groups: the groups whose state this process saves.
      keep: committed own checkpoints kept per group (Orbax max_to_keep).
      run: the run's identity (`checkpoint.run_identity`).
      primary: this process writes what only one process of a job writes
        (locks, run.json, moving corrupt steps aside).
    """
    self.workdir, self.exchange_root = workdir, exchange_dir
    self.run = run
    self.run_dir = paths.run_dir(exchange_dir, run)
    self.groups, self.keep, self.primary = list(groups), keep, primary
    self.multi_process = jax.process_count() > 1
    self._checkpointers: dict[int, ckpt_lib.Checkpointer] = {}
    self._publishers: dict[int, exchange.Publisher] = {}
    self._locks: list[WriterLock] = []
    self._members: dict[int, dict] = {}  # Manifest entries written here.
    self._corrupt: dict[int, list[int]] = {g: [] for g in groups}
    self.last_saved: dict[int, int | None] = {g: None for g in groups}

  # -- Reads (before anything is written). ----------------------------------
  def check_writers(self) -> None:
    """Refuses now if a live process already writes one of our groups."""
    for g in self.groups:
      WriterLock(paths.lock_file(self.workdir, g), g, self.workdir).check()

  def resume(self, group: int, abstract_state: Any) -> tuple[int | None, Any]:
    """(step, state) of `group`'s newest good own checkpoint, or (None, None).

    A corrupt step (damaged after it committed) is skipped with one line
    naming it, and the one before is tried; `open()` moves skipped steps
    aside. Only when every committed step is corrupt does it stop.
    """
    directory = paths.checkpoints_dir(self.workdir, group)
    steps = ckpt_lib.committed_steps(directory)
    for step in reversed(steps):
      try:
        state = ckpt_lib.restore_state(directory, step, abstract_state,
                                       name=f"restore_g{group}")
      except ckpt_lib.Corrupt as e:
        logging.warning("group %d: own checkpoint %s/%d is corrupt (%s); "
                        "resuming from the one before", group, directory,
                        step, e)
        self._corrupt[group].append(step)
        continue
      self.last_saved[group] = step
      return step, state
    if steps:
      raise ConfigError(
          f"every own checkpoint of group {group} under {directory} is "
          f"corrupt (steps {steps}); move them away to train from scratch "
          "(or from config.init_checkpoint), or use a fresh --workdir")
    return None, None

  def check_joinable(self, groups: list[int]) -> None:
    """Groups beyond those started join a running run: its folder must be
    on the exchange (the same config and exchange dir as its groups)."""
    started = (exchange.read_members(self.run_dir) or
               os.path.exists(os.path.join(self.run_dir, "run.json")))
    if not started:
      raise ConfigError(
          f"--groups={','.join(map(str, groups))} joins a running run, but "
          f"the exchange dir {self.exchange_root} holds no run {self.run}: "
          "start its first groups first, with the same config and "
          "config.codistill.exchange_dir (a config that differs in more "
          "than config.group.g<joiner> is another run)")

  # -- Writes. -------------------------------------------------------------
  def open(self, publishing: list[int] = (), config=None,
           members: dict[int, dict] | None = None) -> None:
    """Takes the writer locks and creates the managers: the first writes.

    Args:
      publishing: the groups that publish params for peers.
      config: the run's config, written to the run's exchange folder.
      members: {group: what the manifest says of it (its architecture,
        devices)} for the groups that publish (`exchange.write_member`).

    A write that fails here releases what was taken: nothing is left that
    refuses a rerun.
    """
    try:
      self._open(publishing, config)
      if self.primary:
        for g in publishing:
          self._members[g] = {**(members or {}).get(g, {}),
                              "status": "running", "joined": time.time()}
          exchange.write_member(self.run_dir, g, self._members[g])
    except BaseException:
      self.release()
      raise

  def _open(self, publishing, config) -> None:
    if self.primary:
      for g in self.groups:
        lock = WriterLock(paths.lock_file(self.workdir, g), g, self.workdir)
        lock.acquire()
        self._locks.append(lock)
      self._move_corrupt_aside()
      if publishing:
        self._write_run_file(config)
        self._note_other_runs()
    if self.multi_process and any(self._corrupt.values()):
      # Other processes list steps only after the primary moved them.
      multihost_utils.sync_global_devices("codistill_corrupt_moved")
    for g in self.groups:
      self._checkpointers[g] = ckpt_lib.Checkpointer(
          paths.checkpoints_dir(self.workdir, g), self.keep,
          name=f"state_g{g}")
    for g in publishing:
      self._publishers[g] = exchange.Publisher(
          self.run_dir, g, self.run,
          fmt=config.codistill.exchange_format if config else None)

  def _move_corrupt_aside(self) -> None:
    for g, steps in self._corrupt.items():
      directory = paths.checkpoints_dir(self.workdir, g)
      for step in steps:
        # Renamed, not deleted: a human may want to look at it; Orbax
        # ignores names that are not step numbers.
        stamp = time.strftime("%Y%m%d-%H%M%S")
        os.rename(os.path.join(directory, str(step)),
                  os.path.join(directory, f"{step}.corrupt-{stamp}"))
        logging.warning("group %d: moved corrupt step %d aside to %s/%d."
                        "corrupt-%s", g, step, directory, step, stamp)

  def _write_run_file(self, config) -> None:
    """run.json in the run's exchange folder (atomic; first writer wins)."""
    path = os.path.join(self.run_dir, "run.json")
    if config is None or os.path.exists(path) or "://" in path:
      return
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
    try:
      os.makedirs(self.run_dir, exist_ok=True)
      with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2))
      os.replace(tmp, path)
    except OSError as e:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise ckpt_lib.storage_error("the run's identity", self.run_dir,
                                   e) or e

  def _note_other_runs(self) -> None:
    """One line when the exchange root holds other runs' published params."""
    root = self.exchange_root
    if "://" in root:
      return
    runs = paths.runs_dir(root)
    others = sorted(r for r in (os.listdir(runs) if os.path.isdir(runs)
                                else []) if r != self.run)
    legacy = sorted(d for d in os.listdir(root) if d.startswith("group_") and
                    os.path.isdir(os.path.join(root, d, "published")))
    if not others and not legacy:
      return
    def identity(path):  # What tells runs apart (as in run_identity).
      d = _read_json(path)
      if d:
        for k in ckpt_lib.RESUMABLE_FIELDS:
          d.pop(k, None)
        d.get("codistill", {}).pop("exchange_dir", None)
      return d

    mine = identity(os.path.join(self.run_dir, "run.json"))
    described = []
    for r in others:
      theirs = identity(os.path.join(paths.run_dir(root, r), "run.json"))
      diff = (sorted(ckpt_lib.diff_keys(theirs, mine)) if theirs and mine
              else [])
      described.append(r + (f" (differs in {', '.join(diff[:3])})"
                            if diff else ""))
    if legacy:
      described.append(f"unlabelled {', '.join(legacy)} of an older layout")
    logging.warning("exchange dir %s also holds published params of other "
                    "runs, which this run never reads or deletes: %s", root,
                    "; ".join(described))

  def publish(self, group: int, step: int, params: Any, *, final: bool,
              blocking: bool, meta: dict | None = None) -> None:
    """Publishes `group`'s params of `step` for its peers.

    Args:
      group: the publishing group.
      step: the step the params are of.
      params: the group's params (not modified; safe to donate afterwards).
      final: the run's last step: always published, never skipped.
      blocking: wait until committed (else a save still running from the
        previous exchange makes this one skip rather than stall the loop).
      meta: small facts committed with the params (its validation loss).
    """
    publisher = self._publishers[group]
    if self.multi_process:
      self._checkpointers[group].wait()
    publisher.publish(step, params, if_idle=not (final or blocking),
                      meta=meta)
    if blocking:
      publisher.wait()

  def publishes_skipped(self, group: int) -> int:
    """Publishes of `group` skipped because its previous save still ran."""
    return self._publishers[group].skipped

  def publish_cost(self, group: int) -> exchange.Cost:
    """CPU (of the publisher's own thread) and bytes of `group`'s publishes."""
    return self._publishers[group].cost

  def save(self, step: int, states: dict[int, Any]) -> None:
    """Starts async saves of each group's own state at `step`.

    Each step commits with the run's identity, the state's checksum and
    its params' (`checkpoint.params_checksum`).
    """
    for g, state in states.items():
      if self.multi_process and g in self._publishers:
        self._publishers[g].wait()
      sums = np.asarray(ckpt_lib.checksum(state)).tolist()
      self._checkpointers[g].save(step, state, {
          "run": self.run, "checksum": sums,
          # What readers of the params alone verify (init, teachers).
          "params_checksum": ckpt_lib.params_checksum(state, sums)})
      self.last_saved[g] = step

  def leave(self, step: int, status: str = "left") -> None:
    """Marks this job's publishing groups as gone from the run's manifest
    (peers stop waiting for them; their last params stay readable)."""
    for g, record in self._members.items():
      try:
        exchange.write_member(self.run_dir, g, {
            **record, "status": status, "left": time.time(), "step": step})
      except (OSError, ValueError) as e:  # The job ends either way.
        logging.warning("group %d: could not mark it %s in the manifest: "
                        "%s", g, status, e)
    self._members = {}

  def close(self) -> None:
    """Waits for every save and publish to commit, then closes the managers."""
    try:
      for g in self.groups:
        if g in self._checkpointers:
          self._checkpointers[g].wait()
        if g in self._publishers:
          self._publishers[g].close()
        if g in self._checkpointers:
          self._checkpointers[g].close()
    finally:
      self.release()

  def release(self) -> None:
    """Gives up the writer locks (also on an error: see train.py)."""
    for lock in self._locks:
      lock.release()
    self._locks = []


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


# ----------------------------------------------------------------------------
# One writer per group.
# ----------------------------------------------------------------------------
def _proc_start(pid: int) -> str | None:
  """The kernel's start time of process `pid` (tells a reused pid apart)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


class WriterLock:
  """`WORKDIR/group_<g>/writer.lock`: the one process that writes a group.

  The lock file names its holder (host, pid, the pid's start time, when) and
  is created whole: the record is written to a file of its own and
  hard-linked into place, which fails if the lock exists (atomic on a local
  filesystem and on NFSv3 and later). Its holder refreshes the mtime every
  `HEARTBEAT_S` seconds.

  The rule for a lock that exists, stated once:
    * a record this code can read, on this host: held while a process with
      that pid and start time runs; else its holder died (taken over);
    * a record from another host: held while its mtime is younger than
      `STALE_S` (three times NFS's usual 60 s attribute cache, so a live
      holder is never judged dead); else taken over;
    * an empty, torn or unparsable file (a crash of an older version, a
      disk that filled while it was written, a stray file): no holder can
      be named, and no live writer of this code leaves one, so it is taken
      over, with a warning naming it.
  A lock that is taken over is renamed aside first (only one of several
  contenders' renames succeeds). Without hard links (some FUSE mounts) the
  lock is created with O_EXCL and written in place.
  """

  HEARTBEAT_S = 20.0
  STALE_S = 180.0

  def __init__(self, path: str, group: int, workdir: str):
    self.path, self.group, self.workdir = path, group, workdir
    self._token = None
    self._stop = threading.Event()
    self._thread = None

  def _record(self) -> dict | None:
    """The lock's holder record; None if it is missing or unparsable."""
    info = _read_json(self.path)
    if not isinstance(info, dict):
      return None
    ok = (isinstance(info.get("host"), str) and
          isinstance(info.get("pid"), int) and
          not isinstance(info.get("pid"), bool))
    return info if ok else None

  def _holder(self) -> dict | None:
    """The live holder's record, or None when the lock may be taken."""
    info = self._record()
    try:
      age = time.time() - os.stat(self.path).st_mtime
    except OSError:
      return None  # No lock (or it just went).
    if info is None:
      return None  # Empty or unparsable: see the rule above.
    if info["host"] == socket.gethostname():
      alive = _proc_start(info["pid"]) == info.get("pid_start")
      return info if alive and info["pid"] != os.getpid() else None
    return info if age < self.STALE_S else None

  def _refuse(self, info: dict) -> None:
    raise ConfigError(
        f"group {self.group} of --workdir={self.workdir} is being written by "
        f"pid {info.get('pid')} on {info.get('host')} since "
        f"{info.get('since')} ({self.path}); stop that run first, or use "
        "another --workdir")

  def check(self) -> None:
    """Raises ConfigError if a live process holds the lock (reads only)."""
    info = self._holder()
    if info is not None:
      self._refuse(info)

  def _refused_write(self, e: OSError) -> StorageError:
    return StorageError(
        f"cannot write {self.path}: {e.strerror or e}; free space or point "
        "--workdir at a writable directory, then rerun the same command")

  def acquire(self) -> None:
    token = uuid.uuid4().hex
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "pid_start": _proc_start(os.getpid()), "token": token,
              "since": datetime.datetime.now(datetime.timezone.utc).strftime(
                  "%Y-%m-%d %H:%M:%S UTC")}
    tmp = f"{self.path}.{token}.tmp"
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      with open(tmp, "w") as f:
        json.dump(record, f)
      for _ in range(2):
        if self._create(tmp, record):
          break
        info = self._holder()
        if info is not None:
          self._refuse(info)
        self._take_over(token)
      else:
        self._refuse(self._holder() or {"host": "?", "pid": "?",
                                        "since": "?"})
    except OSError as e:
      raise self._refused_write(e) from None
    finally:
      try:
        os.remove(tmp)
      except OSError:
        pass
    self._token = token
    self._thread = threading.Thread(target=self._beat, daemon=True,
                                    name=f"writer-lock-g{self.group}")
    self._thread.start()

  def _create(self, tmp: str, record: dict) -> bool:
    """Puts the lock in place, whole; False if one exists."""
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    except OSError as e:
      if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP,
                         errno.EXDEV, errno.EMLINK):
        raise
    try:  # No hard links here: create exclusively and write in place.
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    try:
      with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    except OSError:
      os.remove(self.path)  # Never leave a lock that names nobody.
      raise
    return True

  def _take_over(self, token: str) -> None:
    """Moves a stale lock aside (of several contenders one wins)."""
    info = self._record()
    try:
      os.rename(self.path, f"{self.path}.stale.{token}")
    except FileNotFoundError:
      return  # Another contender moved it first; try to create again.
    why = (f"its holder pid {info['pid']} on {info['host']} is gone" if info
           else "it was empty or unparsable, so it names no holder")
    logging.warning("group %d: took over the stale writer lock %s (%s)",
                    self.group, self.path, why)
    os.remove(f"{self.path}.stale.{token}")

  def _beat(self) -> None:
    while not self._stop.wait(self.HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:
        pass  # Taken over or unreachable: the next save reports the disk.

  def release(self) -> None:
    if self._token is None:
      return
    self._stop.set()
    if (_read_json(self.path) or {}).get("token") == self._token:
      try:
        os.remove(self.path)
      except OSError:
        pass
    self._token = None


# ----------------------------------------------------------------------------
# Stopping cleanly.
# ----------------------------------------------------------------------------
# Set by `Preemption`'s handler: what waits inside a step (a group waiting for
# a slow peer) gives up waiting when a stop was asked for.
_STOP = threading.Event()


def stop_requested() -> bool:
  """Whether SIGTERM or Ctrl-C arrived (single-process jobs)."""
  return _STOP.is_set()


class Preemption:
  """SIGTERM or Ctrl-C -> a flag the loop checks each step: save, then exit.

  In a multi-process job all processes must stop at the same step, so there
  the decision comes from JAX's preemption sync point instead: no Python
  SIGTERM handler is installed (it would replace JAX's notifier), and Ctrl-C
  is turned into a SIGTERM to this process for JAX to see.
  """

  def __init__(self):
    self.requested = False
    self._old = {}
    self._multi_process = jax.process_count() > 1

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      signals = (signal.SIGINT,) if self._multi_process else (
          signal.SIGTERM, signal.SIGINT)
      for sig in signals:
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self._multi_process:  # JAX's notifier decides the common stop step.
      os.kill(os.getpid(), signal.SIGTERM)
      return
    logging.warning("%s: saving a checkpoint and exiting.",
                    signal.Signals(signum).name)
    self.requested = True
    _STOP.set()

  def should_stop(self, step: int) -> bool:
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    _STOP.clear()

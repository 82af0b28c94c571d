"""The job's one owner of what it writes: checkpoints, published params, stops.

A job holds several Orbax managers: per group it drives, one for its own
TrainState (`checkpoint.Checkpointer`) and, when it codistils, one for the
params it publishes to its peers (`exchange.Publisher`). The rules that keep
them from deadlocking a multi-process job live here and nowhere else:

  * Every manager has barrier keys of its own (its name), so one manager's
    cross-process barrier is never met by another's arrivals.
  * In a multi-process job two managers' finalizers must not interleave
    their barriers: before a group saves its own state it waits for its
    publisher, and before it publishes it waits for its own save.
  * In a multi-process job SIGTERM is JAX's: a Python handler would replace
    its preemption notifier and the agreed stop step would never come, so
    `Preemption` asks JAX's sync point there and keeps a handler only in a
    single process.

The loop says `save`, `publish`, `should_stop`; it never branches on the
process count. Reads (which step to resume, restoring it) write nothing, so
set-up can fail on bad input and leave the workdir as it was; managers are
created by `open()`, after set-up has checked everything.
"""

import signal
import threading
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils

from codistill_jax import checkpoint as ckpt_lib
from codistill_jax import exchange
from codistill_jax import paths


class Storage:
  """The checkpoints and published params of the groups this job drives."""

  def __init__(self, workdir: str, exchange_dir: str, groups: list[int],
               keep: int = 3):
    """Nothing is created or written here.

    Args:
      workdir: the run directory (paths.py gives its layout).
      exchange_dir: where groups publish params for their peers.
      groups: the groups whose state this process saves.
      keep: committed own checkpoints kept per group (Orbax max_to_keep).
    """
    self.workdir, self.exchange_dir = workdir, exchange_dir
    self.groups, self.keep = list(groups), keep
    self.multi_process = jax.process_count() > 1
    self._checkpointers: dict[int, ckpt_lib.Checkpointer] = {}
    self._publishers: dict[int, exchange.Publisher] = {}
    self.last_saved: dict[int, int | None] = {g: None for g in groups}

  # -- Reads (before anything is written). ----------------------------------
  def resume_step(self, group: int) -> int | None:
    """The newest committed own checkpoint of `group`, or None."""
    steps = ckpt_lib.committed_steps(paths.checkpoints_dir(self.workdir,
                                                           group))
    step = steps[-1] if steps else None
    self.last_saved[group] = step
    return step

  def restore(self, group: int, step: int, abstract_state: Any) -> Any:
    """`group`'s own state at a committed `step`, on its shardings."""
    return ckpt_lib.restore_state(
        paths.checkpoints_dir(self.workdir, group), step, abstract_state,
        name=f"restore_g{group}")

  # -- Writes. -------------------------------------------------------------
  def open(self, publishing: list[int] = ()) -> None:
    """Creates the managers (and their directories): the first writes.

    Args:
      publishing: the groups that publish params for peers.
    """
    for g in self.groups:
      self._checkpointers[g] = ckpt_lib.Checkpointer(
          paths.checkpoints_dir(self.workdir, g), self.keep,
          name=f"state_g{g}")
    for g in publishing:
      self._publishers[g] = exchange.Publisher(self.exchange_dir, g)

  def publishes_skipped(self, group: int) -> int:
    """Publishes of `group` skipped because its previous save still ran."""
    return self._publishers[group].skipped

  def publish(self, group: int, step: int, params: Any, *, final: bool,
              blocking: bool) -> None:
    """Publishes `group`'s params of `step` for its peers.

    Args:
      group: the publishing group.
      step: the step the params are of.
      params: the group's params (not modified; safe to donate afterwards).
      final: the run's last step: always published, never skipped.
      blocking: wait until committed (else a save still running from the
        previous exchange makes this one skip rather than stall the loop).
    """
    publisher = self._publishers[group]
    if self.multi_process:
      self._checkpointers[group].wait()
    publisher.publish(step, params, if_idle=not (final or blocking))
    if blocking:
      publisher.wait()

  def save(self, step: int, states: dict[int, Any]) -> None:
    """Starts async saves of each group's own state at `step`."""
    for g, state in states.items():
      if self.multi_process and g in self._publishers:
        self._publishers[g].wait()
      self._checkpointers[g].save(step, state)
      self.last_saved[g] = step

  def close(self) -> None:
    """Waits for every save and publish to commit, then closes the managers."""
    for g in self.groups:
      if g in self._checkpointers:
        self._checkpointers[g].wait()
      if g in self._publishers:
        self._publishers[g].close()
      if g in self._checkpointers:
        self._checkpointers[g].close()


class Preemption:
  """SIGTERM -> a flag the loop checks each step: save, then exit cleanly.

  In a multi-process job all processes must stop at the same step, so there
  the decision comes from JAX's preemption sync point instead (and no Python
  handler is installed: it would replace JAX's notifier).
  """

  def __init__(self):
    self.requested = False
    self._old = None
    self._multi_process = jax.process_count() > 1

  def __enter__(self):
    if (not self._multi_process and
        threading.current_thread() is threading.main_thread()):
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint and exiting.")
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

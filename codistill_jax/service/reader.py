"""The student side: wraps a batch iterator, adds `batch['teacher']`.

`TargetReader(batches, pool, ...)` keeps `depth` batches in flight across the
pool's workers and yields them in their original order, each with the
teacher's target added. Every batch is yielded exactly once: a request whose
worker died, raised, or did not answer within `timeout_s` is sent again to
another worker (up to `retries` times); a late answer to an abandoned request
is ignored. Workers that join are used as soon as they are ready (the least
loaded worker gets the next request); workers that leave are dropped.

With no live worker the reader either waits (`no_worker='wait'`, up to
`wait_timeout_s`, then `NoTeacherError`) or computes the target in this
process (`'fallback'`, with an in-process `Teacher` built on first use).

Everything runs in the caller's thread, inside `next()`: nothing can die
silently in the background.
"""

import collections
import dataclasses
import time
from typing import Any, Callable, Iterator

from absl import logging
import ray

from codistill_jax.service import pool as pool_lib

NO_WORKER_POLICIES = ("wait", "fallback")


class NoTeacherError(RuntimeError):
  """No teacher worker was alive for longer than the wait timeout."""


class TeacherRequestError(RuntimeError):
  """A batch failed on every worker it was sent to."""


@dataclasses.dataclass
class _Item:
  seq: int
  batch: dict
  inputs_ref: Any  # The inputs in Ray's object store: retries resend a ref.
  ref: Any = None  # The outstanding request, or None when not assigned.
  worker: str = ""
  sent_at: float = 0.0
  attempts: int = 0
  tried: set = dataclasses.field(default_factory=set)
  result: Any = None
  errors: list = dataclasses.field(default_factory=list)


class TargetReader:
  """Iterator over `batches` with `batch['teacher']` from the service."""

  def __init__(self, batches: Iterator[dict], pool: pool_lib.Pool, *,
               depth: int = 4, timeout_s: float = 60.0, retries: int = 3,
               no_worker: str = "wait", wait_timeout_s: float = 120.0,
               fallback: Callable[[], Callable[[Any], dict]] | None = None,
               poll_s: float = 0.05):
    """Args:

      batches: any iterator of dicts of numpy arrays with an 'inputs' entry.
      pool: the teacher's workers (`pool_lib.Pool`).
      depth: batches in flight (sent ahead of the one being consumed).
      timeout_s: a request unanswered this long is sent elsewhere.
      retries: resends of one batch before `TeacherRequestError`.
      no_worker: 'wait' or 'fallback' (see the module docstring).
      wait_timeout_s: how long 'wait' waits for a worker.
      fallback: factory of the in-process teacher (`inputs -> target`),
        called once, on first use; required for 'fallback'.
      poll_s: how often, while waiting, to look for answers and workers.
    """
    if no_worker not in NO_WORKER_POLICIES:
      raise ValueError(f"no_worker={no_worker!r}: use one of "
                       f"{NO_WORKER_POLICIES}")
    if no_worker == "fallback" and fallback is None:
      raise ValueError("no_worker='fallback' needs a fallback teacher")
    self._batches = iter(batches)
    self.pool = pool
    self.depth, self.timeout_s, self.retries = depth, timeout_s, retries
    self.no_worker, self.wait_timeout_s = no_worker, wait_timeout_s
    self._fallback_factory, self._fallback = fallback, None
    self.poll_s = poll_s
    self._pending: collections.deque[_Item] = collections.deque()
    self._seq = 0
    self._exhausted = False
    self.stats = {"batches": 0, "retries": 0, "timeouts": 0,
                  "fallback_batches": 0, "served": collections.Counter()}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    self.pool.refresh()
    self._fill()
    if not self._pending:
      raise StopIteration
    head = self._pending[0]
    target = self._resolve(head)
    self._pending.popleft()
    self.stats["batches"] += 1
    self._fill()  # Keep `depth` in flight while the caller trains.
    return {**head.batch, "teacher": target}

  def metrics(self) -> dict[str, float]:
    """Scalars for the trainer's log (counts since the start)."""
    return {"service/workers": float(len(self.pool.usable())),
            "service/workers_joined": float(self.pool.joined),
            "service/workers_left": float(self.pool.left),
            "service/retries": float(self.stats["retries"]),
            "service/timeouts": float(self.stats["timeouts"]),
            "service/fallback_batches": float(self.stats["fallback_batches"])}

  def close(self) -> None:
    """Forgets outstanding requests (their late answers are dropped)."""
    for item in self._pending:
      self._release(item)
    self._pending.clear()

  # --------------------------------------------------------------------------
  # Sending.
  # --------------------------------------------------------------------------
  def _fill(self) -> None:
    while not self._exhausted and len(self._pending) < self.depth:
      try:
        batch = next(self._batches)
      except StopIteration:
        self._exhausted = True
        break
      item = _Item(self._seq, batch, ray.put(batch["inputs"]))
      self._seq += 1
      self._pending.append(item)
      self._send(item)

  def _send(self, item: _Item) -> None:
    """Sends `item` to the least loaded worker it has not failed on."""
    worker = self.pool.pick(avoid=item.tried)
    if worker is None:
      return  # Stays unassigned; `_resolve` waits or falls back.
    item.ref = worker.handle.predict.remote(item.inputs_ref)
    item.worker, item.sent_at = worker.name, time.monotonic()
    worker.in_flight += 1

  def _release(self, item: _Item) -> None:
    worker = self.pool.workers.get(item.worker)
    if worker is not None and item.ref is not None:
      worker.in_flight -= 1
    item.ref, item.worker = None, ""

  def _failed(self, item: _Item, why: str) -> None:
    """Records a failed attempt and sends the batch again elsewhere."""
    item.tried.add(item.worker)
    item.errors.append(f"{item.worker}: {why}")
    item.attempts += 1
    self._release(item)
    if item.attempts > self.retries:
      raise TeacherRequestError(
          f"batch {item.seq} failed on {item.attempts} attempts "
          f"(config.codistill.service.retries={self.retries}): "
          f"{'; '.join(item.errors[-3:])}")
    self.stats["retries"] += 1
    self._send(item)

  # --------------------------------------------------------------------------
  # Receiving.
  # --------------------------------------------------------------------------
  def _resolve(self, head: _Item) -> dict:
    """Blocks until the head batch has its target; handles every failure."""
    waiting_since = None
    while head.result is None:
      for item in self._pending:
        if item.ref is None and item.result is None:
          self._send(item)
      if head.ref is None:  # No usable worker at all.
        if self.no_worker == "fallback":
          return self._local(head)
        waiting_since = waiting_since or time.monotonic()
        waited = time.monotonic() - waiting_since
        if waited > self.wait_timeout_s:
          raise NoTeacherError(
              f"no teacher worker alive in Ray namespace "
              f"{pool_lib.NAMESPACE!r} (teacher {self.pool.prefix[:-1]}) for "
              f"{waited:.0f} s (config.codistill.service.wait_timeout_s); "
              "start workers (config.codistill.service.num_workers) or set "
              "config.codistill.service.no_worker='fallback'"
              + (f"; last worker error: {self.pool.last_error}"
                 if self.pool.last_error else ""))
        time.sleep(self.poll_s)
        self.pool.refresh(force=True)
        continue
      waiting_since = None
      self._collect()
      self.pool.refresh()
    return head.result

  def _collect(self) -> None:
    """Waits up to `poll_s` for answers; stores them, retries failures."""
    out = {i.ref: i for i in self._pending
           if i.ref is not None and i.result is None}
    if not out:
      return
    done, _ = ray.wait(list(out), num_returns=1, timeout=self.poll_s)
    # Everything else that is already done, in one more cheap call.
    if done:
      rest = [r for r in out if r not in done]
      if rest:
        done += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
    for ref in done:
      item = out[ref]
      try:
        result = ray.get(ref)
      except ray.exceptions.RayActorError as e:
        # The worker is gone (killed, crashed, node lost): drop it now, not
        # at the next listing, so nothing else is sent to it.
        self.pool.last_error = f"{item.worker} died: {type(e).__name__}"
        self.pool.drop(item.worker, "died")
        self._failed(item, type(e).__name__)
        continue
      except ray.exceptions.RayError as e:
        self.pool.last_error = f"{item.worker}: {e}"
        self._failed(item, str(e).splitlines()[0] if str(e) else repr(e))
        continue
      worker = self.pool.workers.get(item.worker)
      if worker is not None:
        worker.served += 1
      self.stats["served"][item.worker] += 1
      self._release(item)
      item.result = result
    now = time.monotonic()
    for item in out.values():
      if item.result is None and item.ref is not None and (
          now - item.sent_at > self.timeout_s):
        worker = self.pool.workers.get(item.worker)
        if worker is not None:  # Probably hung: give it a rest.
          worker.bad_until = now + self.timeout_s
        self.stats["timeouts"] += 1
        self._failed(item, f"no answer in {self.timeout_s:g} s")

  def _local(self, item: _Item) -> dict:
    if self._fallback is None:
      logging.warning("teacher service: no live worker; computing teacher "
                      "targets in this process until one joins")
      self._fallback = self._fallback_factory()
    self.stats["fallback_batches"] += 1
    item.result = self._fallback(item.batch["inputs"])
    return item.result

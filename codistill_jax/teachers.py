"""Where a group's teachers come from: one small protocol, one class per source.

`config.codistill.teacher_source` (and, for peers, `codistill.method` and
`num_groups`) picks the class: `source_class(config)`. This module is the only
place that asks which source a config has; everything else (the trainer,
`tools/compile_check`, the service, the target store) goes through the
protocol. Each class declares:

  publishes       whether its groups publish their params on shared storage
                  every exchange (peers read them)
  shared_init     whether every group starts from the same params (group 0's)
  distills        whether the train step has a distillation term
  check_config(config)  (classmethod) the rules for the fields it uses
  layout(config, setup, batch, group)  (classmethod) what group `group`'s
                  step is compiled for (`build.Layout`; `config` is the
                  run's): the teachers' model(s) (None when targets arrive
                  in the batch), the step's extra arguments and extra batch
                  entries, as ShapeDtypeStructs on the group's mesh;
                  `compile_check` uses it without making a source

and, made from a `Context` (`Sources.make`), the hooks the loop calls once
per phase:

  wrap(batches)   the group's batch stream (the service and the store add
                  `batch['teacher']`).
  step_args(step) the extra arguments of the update from `step` (stacked
                  `Teachers`).
  share(step, params)   after every group's step: publish own params.
  refresh(step)   after every group shared: pick up new teachers.
  update(step, state)   after every group refreshed: the group's new state
                  (parameter averaging sets the averaged params).
  relayout()      after update: a new `Layout` when the group's teachers
                  changed (a peer joined the run); the loop rebuilds the
                  step with it.
  evaluated(step, metrics)  after a periodic eval: the group's validation
                  metrics (published with its params: peers may weigh it).
  metrics(step)   scalars for the log at a log step.
  close()

The sources:

  NoTeachers      plain training (one group, or nothing to distil from).
  Peers           codistillation: the other groups' newest committed params
                  on shared storage (Anil et al. 2018).
  Averaging       no teachers: the same exchange feeds periodic parameter
                  averaging (local SGD / DiLoCo; `codistill.method='average'`).
  FromCheckpoint  two-phase distillation from a trained teacher of any
                  architecture, in this process.
  FromService     the same teacher served by a pool of Ray workers
                  (EDL-Dist; the `service` extra).
  FromStore       the teacher's targets written once by
                  `python -m codistill_jax.tools.store_targets`; the teacher
                  never runs in training.

A new source is one class here and an entry in `SOURCES`.
"""

import dataclasses
import importlib.util
import json
import os
import time
from typing import Any, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from codistill_jax import averaging
from codistill_jax import build
from codistill_jax import cadence
from codistill_jax import checkpoint as ckpt_lib
from codistill_jax import config_lib
from codistill_jax import exchange
from codistill_jax import mesh as mesh_lib
from codistill_jax import models
from codistill_jax import step as step_lib
from codistill_jax import storage as storage_lib
from codistill_jax.errors import ConfigError

TEACHER_DTYPES = ("float32", "bfloat16")
# How a group weighs its teachers (config.codistill.teacher_weighting).
WEIGHTINGS = ("uniform", "freshness", "val_loss")
# What a joining group starts from (config.codistill.join_init).
JOIN_INITS = ("scratch", "peer")


Layout = build.Layout


@dataclasses.dataclass(frozen=True)
class Context:
  """What a group's source is made from (`Sources.make`). Reads only."""
  config: Any  # The group's own config (`config_lib.group_config`).
  group: int
  setup: build.Setup
  datasets: Any
  params: Any  # The group's initial (or resumed) params.
  storage: Any  # The job's `storage.Storage`.
  total_steps: int
  shared: dict  # What one job's sources share (the teacher service).
  run_config: Any = None  # The run's config (every group's fields).


class Source:
  """The protocol, with the hooks' do-nothing defaults."""

  publishes = False
  shared_init = False
  distills = False

  def __init__(self, ctx: Context):
    del ctx

  @classmethod
  def check_config(cls, config) -> None:
    del config

  @classmethod
  def layout(cls, config, setup: build.Setup, batch: dict,
             group: int = 0) -> Layout:
    del config, setup, batch, group
    return Layout()

  def wrap(self, batches: Iterator[dict]) -> Iterator[dict]:
    return batches

  def step_args(self, step: int) -> tuple:
    del step
    return ()

  def share(self, step: int, params: Any) -> None:
    del step, params

  def refresh(self, step: int) -> None:
    del step

  def update(self, step: int, state: Any) -> Any:
    del step
    return state

  def evaluated(self, step: int, metrics: dict[str, float]) -> None:
    del step, metrics

  def relayout(self) -> Layout | None:
    return None

  def metrics(self, step: int) -> dict[str, float]:
    del step
    return {}

  def close(self) -> None:
    pass


class NoTeachers(Source):
  """Plain training: the synchronous data-parallel baseline."""

  @classmethod
  def check_config(cls, config):
    cd = config.codistill
    if cd.method == "average":
      never_acts("codistill.method", "'average'", "one group has no peers "
                 "to average with", "set config.codistill.num_groups to 2 or "
                 "more, or method='distill'")
    if cd.max_staleness:
      never_acts("codistill.max_staleness", cd.max_staleness, "one group "
                 "has no peers to wait for", "set it to 0, or "
                 "config.codistill.num_groups to 2 or more")


# ----------------------------------------------------------------------------
# Peers: codistillation through shared storage.
# ----------------------------------------------------------------------------
class Peers(Source):
  """The other groups' newest committed params, refreshed every exchange.

  Every `codistill.exchange_every` steps the group publishes its params
  (through the job's `storage.Storage`) and reloads its peers' newest
  committed ones (`exchange.PeerReader`, in the background unless
  `exchange_blocking`); halfway between exchanges it looks again for saves
  that had not committed yet (bounds staleness at ~1.5 intervals). With
  `max_staleness`, a group whose peer's newest published step is further
  behind waits for it at the exchange, up to `peer_timeout_s`.
  """

  publishes = True
  distills = True
  # The dtype teachers are held in (None: config.codistill.teacher_dtype).
  dtype = None

  @classmethod
  def check_config(cls, config):
    cd = config.codistill
    # Teachers arrive at the first exchange and act from the next step on.
    if cd.exchange_every >= config.total_steps:
      never_acts("codistill.exchange_every", cd.exchange_every,
                 f"the first exchange comes at step {cd.exchange_every} of "
                 f"config.total_steps={config.total_steps}, so no step ever "
                 "has a teacher", "use an interval shorter than the run")

  def __init__(self, ctx: Context):
    cd, group, storage = ctx.config.codistill, ctx.group, ctx.storage
    setup, params = ctx.setup, ctx.params
    self.group, self.storage, self.total = group, storage, ctx.total_steps
    self.every, self.blocking = cd.exchange_every, cd.exchange_blocking
    self.publish_blocking = self.blocking  # Wait until it is committed.
    self.max_staleness, self.peer_timeout_s = (cd.max_staleness,
                                               cd.peer_timeout_s)
    self.weighting, self.weighting_t = (cd.teacher_weighting,
                                        cd.weighting_temperature)
    self._dead: dict[int, int] = {}  # Peer -> its newest step when given up.
    self.waited_s = 0.0  # Time spent waiting for peers (max_staleness).
    self.val_loss: float | None = None  # Own newest, published with params.
    # Peers of each architecture (`_reads`: a group with alpha 0 reads
    # none, e.g. the big group of live big-to-small distillation).
    self.run_config, self.setup = ctx.run_config or ctx.config, setup
    self.reads = self._reads(cd)
    self._teacher_dtype = self.dtype or cd.teacher_dtype
    self.archs = {h: architecture(self.run_config, h)
                  for h in range(cd.num_groups) if h != group}
    self.sets = peer_sets(self.run_config, group, setup,
                          self.archs) if self.reads else []
    self.readers = [self._reader(ps) for ps in self.sets]
    self.reader = self.readers[0] if self.readers else None
    # Groups that come and go (docs/groups.md): the manifest is read at each
    # exchange when groups may join; a peer that left is not waited for.
    self.joinable = config_lib.max_groups(self.run_config) > cd.num_groups
    self._left: set[int] = set()
    self._new_layout: Layout | None = None
    self.membership_changes = 0
    # A resumed group picks up what its peers published; with the blocking
    # exchange before its first step, so that a resumed run is exact.
    for reader in self.readers:
      reader.refresh(block=self.blocking)
    exchange.warm_up(params)
    self.blocked_s = 0.0  # Host time the loop spent in the exchange.
    self._wall0 = None  # When the loop took its first teachers.
    # Per peer, the staleness of the teacher each update of the log window
    # used: [sum, max, count, the newest peer step used].
    self._window = {s.group: [0, 0, 0, None] for r in self.readers
                    for s in r.slots}
    if self.joinable:  # Peers that joined before this group (re)started.
      self._discover()

  @classmethod
  def layout(cls, config, setup, batch, group=0):
    del batch
    own = config_lib.group_config(config, group)
    if not own.codistill.alpha:  # One-way: this group learns from no one.
      return Layout()
    return _peers_layout(own, peer_sets(config, group, setup))

  @staticmethod
  def _reads(cd) -> bool:
    """Whether the group reads its peers: not with alpha 0 (one-way: it
    learns from no one and only publishes)."""
    return bool(cd.alpha)

  def _reader(self, ps: "PeerSet") -> exchange.PeerReader:
    return exchange.PeerReader(self.storage.run_dir, list(ps.peers),
                               ps.abstract, self._teacher_dtype,
                               run=self.storage.run)

  def _discover(self) -> None:
    """Reads the run's manifest: peers that joined get a teacher slot (the
    step is rebuilt: `relayout`), peers that left are no longer waited
    for; both are logged."""
    members = exchange.read_members(self.storage.run_dir)
    top = config_lib.max_groups(self.run_config)
    joined = {}
    self._mark_left(members)
    for h, record in sorted(members.items()):
      if h == self.group or not 0 <= h < top:
        continue
      if h not in self.archs and record.get("model_name"):
        joined[h] = (record["model_name"], record.get("model") or {})
    if not joined:
      return
    self.archs.update(joined)
    self.membership_changes += len(joined)
    for h, (name, _) in joined.items():
      logging.warning("group %d: peer %d joined the run (model %s); %d "
                      "peers now", self.group, h, name, len(self.archs))
    if not self.reads:
      return
    old = {ps.peers: r for ps, r in zip(self.sets, self.readers)}
    self.sets = peer_sets(self.run_config, self.group, self.setup, self.archs)
    readers = []
    for ps in self.sets:
      reader = old.pop(ps.peers, None)
      if reader is None:
        reader = self._reader(ps)
        reader.refresh(block=True)
      readers.append(reader)
    for reader in old.values():
      reader.close()
    self.readers, self.reader = readers, readers[0]
    for h in joined:
      self._window.setdefault(h, [0, 0, 0, None])
    self._new_layout = _peers_layout(
        config_lib.group_config(self.run_config, self.group), self.sets)

  def _mark_left(self, members: dict[int, dict] | None = None) -> None:
    """Peers whose manifest entry says they left (or failed) are no longer
    waited for, and ones running again are; each change is logged.
    `members`: the manifest already read (default: read it now)."""
    if members is None:
      members = exchange.read_members(self.storage.run_dir)
    for h, record in sorted(members.items()):
      if h == self.group:
        continue
      gone = record.get("status") in ("left", "failed")
      if gone == (h in self._left):
        continue
      self.membership_changes += 1
      if gone:
        self._left.add(h)
        logging.warning("group %d: peer %d left the run (%s at step %s); "
                        "not waiting for it, its last params stay its "
                        "teacher", self.group, h, record.get("status"),
                        record.get("step"))
      else:
        self._left.discard(h)
        logging.warning("group %d: peer %d is back", self.group, h)

  def relayout(self):
    new, self._new_layout = self._new_layout, None
    return new

  def _timed(self, fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    self.blocked_s += time.perf_counter() - t
    return out

  def step_args(self, step):
    if self._wall0 is None:
      self._wall0 = time.time()
    if not self.readers:
      return ()
    sets = []
    for reader in self.readers:
      teachers, steps = self._timed(reader.snapshot)
      for group, held in steps.items():
        if held is not None:  # How many steps older the teacher is.
          w = self._window[group]
          w[:] = w[0] + step - held, max(w[1], step - held), w[2] + 1, held
      sets.append(self._weighed(teachers, reader, steps, step))
    return (sets[0] if len(sets) == 1 else tuple(sets),)

  def _weighed(self, teachers, reader, steps, step):
    """`teachers` with each held peer's weight by `teacher_weighting`."""
    if self.weighting == "uniform":
      return teachers  # Held: 1, not yet: 0 (as the reader stacks them).
    slots = [s.group for s in reader.slots]
    w = teacher_weights(self.weighting, [steps[h] for h in slots], step,
                        self.every, [reader.meta(h).get("val_loss")
                                     for h in slots], self.weighting_t)
    return teachers.replace(weights=jnp.asarray(w, jnp.float32))

  def share(self, step, params):
    if cadence.is_time(step, self.every):
      self._timed(self.storage.publish, self.group, step, params,
                  final=step == self.total,
                  blocking=self.publish_blocking, meta=self._meta())

  def _meta(self) -> dict:
    """What is published with the params, for peers that weigh them."""
    return {} if self.val_loss is None else {"val_loss": self.val_loss}

  def evaluated(self, step, metrics):
    # The task's validation loss: 'loss', or 'log_loss' for sigmoid tasks.
    loss = next((v for k, v in metrics.items()
                 if k.rsplit("/", 1)[-1] in ("loss", "log_loss")), None)
    if loss is not None and np.isfinite(loss):
      self.val_loss = float(loss)

  def refresh(self, step):
    if self.joinable and cadence.is_time(step, self.every):
      self._timed(self._discover)
    if not self.readers:
      return
    if cadence.is_time(step, self.every):
      if self.max_staleness:
        # The teachers of the next `every` updates must be new enough, and
        # held before those updates start: wait for them, then restore.
        self._timed(self._wait_for_peers, step)
        for reader in self.readers:
          self._timed(reader.refresh, block=True)
      else:
        for reader in self.readers:
          self._timed(reader.refresh, block=self.blocking)
    elif (not self.blocking and self.every // 2 and
          cadence.is_time(step + self.every // 2, self.every)):
      for reader in self.readers:
        self._timed(reader.start_refresh)

  def _wait_for_peers(self, step: int) -> None:
    """Waits until every live peer has published a step that keeps the
    teachers of updates step .. step + every - 1 within max_staleness."""
    t0, said = time.time(), False
    checked = t0
    while True:
      newest = {h: s for r in self.readers
                for h, s in r.newest_published().items()}
      for h, s in list(self._dead.items()):
        if newest[h] > s:  # It publishes again: wait for it again.
          del self._dead[h]
          logging.warning("group %d: peer %d is back (step %d)", self.group,
                          h, newest[h])
      behind = {h: s for h, s in newest.items() if h not in self._dead and
                h not in self._left and
                step + self.every - 1 - s > self.max_staleness}
      if behind and time.time() - checked > 2.0:
        checked = time.time()  # Every 2 s of waiting: has one left the run?
        self._mark_left()
        behind = {h: s for h, s in behind.items() if h not in self._left}
      if not behind:
        break
      if not said:
        logging.info("group %d at step %d waits for peers %s (newest "
                     "published steps %s; max_staleness %d)", self.group,
                     step, sorted(behind), behind, self.max_staleness)
        said = True
      if storage_lib.stop_requested():
        break  # The loop saves and stops after this step.
      if time.time() - t0 > self.peer_timeout_s:
        for h, s in behind.items():
          self._dead[h] = s
          logging.warning(
              "group %d: peer %d has published nothing newer than step %d "
              "for %.0f s (config.codistill.peer_timeout_s); going on "
              "without waiting for it", self.group, h, s, self.peer_timeout_s)
        break
      time.sleep(0.1)
    self.waited_s += time.time() - t0

  def metrics(self, step):
    """Per peer over the updates since the last log (absent until its params
    are held): staleness mean and max, and the newest peer step used; then
    restore failures and the exchange's cost."""
    del step
    out = {}
    for group, (total, worst, n, newest) in self._window.items():
      if n:
        out[f"staleness/group_{group}"] = total / n
        out[f"staleness_max/group_{group}"] = worst
        out[f"teacher_step/group_{group}"] = newest
      self._window[group] = [0, 0, 0, None]
    for reader in self.readers:
      out.update(reader.failures())
    restore = exchange.Cost(*(sum(getattr(r.cost, f) for r in self.readers)
                              for f in ("cpu_s", "bytes", "calls")))
    # What the exchange cost this group so far, per call (CPU of the
    # exchange's own threads, from thread_time; bytes moved).
    for side, cost in (("publish", self.storage.publish_cost(self.group)),
                       ("restore", restore)):
      if cost.calls:
        out[f"exchange/{side}_cpu_ms"] = 1e3 * cost.cpu_s / cost.calls
        out[f"exchange/{side}_mb"] = cost.bytes / cost.calls / 2**20
        out[f"exchange/{side}s"] = cost.calls
    out["peer_wait_s"] = self.waited_s  # In all: waiting for slower peers.
    if self.max_staleness:
      out["peers_given_up"] = len(self._dead)
    if self.joinable:
      out["peers"] = len(self.archs) - len(self._left)
      out["membership_changes"] = self.membership_changes
    return {**out,
            "exchange_blocked_share": self.blocked_s / max(
                time.time() - (self._wall0 or time.time()), 1e-9),
            "publishes_skipped": self.storage.publishes_skipped(self.group)}

  def close(self):
    for reader in self.readers:
      reader.close()


class Averaging(Peers):
  """Periodic parameter averaging (local SGD / DiLoCo) on the same exchange.

  Every `exchange_every` steps (H) the group publishes its params, reads its
  peers' (synchronous: their params of this very step, waiting for them up
  to `peer_timeout_s`; else the newest it holds, restored in the
  background), and takes an outer optimizer step on the mean delta
  (`averaging.make_outer_step`). The train step distils nothing; the anchor
  and the outer state live in the train state's `opt_state`.
  """

  shared_init = True
  distills = False
  dtype = jnp.float32  # The average is of the full-precision params.

  @staticmethod
  def _reads(cd) -> bool:
    del cd
    return True  # Every group averages with its peers (alpha is unused).

  @classmethod
  def check_config(cls, config):
    cd = config.codistill
    if cd.exchange_every > config.total_steps:
      never_acts("codistill.exchange_every", cd.exchange_every,
                 f"the first average would come after "
                 f"config.total_steps={config.total_steps}",
                 "use an interval no longer than the run")
    avg = cd.averaging
    if avg.quorum > config_lib.max_groups(config):
      raise ConfigError(
          f"config.codistill.averaging.quorum={avg.quorum} exceeds the "
          f"{config_lib.max_groups(config)} groups the run can have; use at "
          "most that (0: all of them)")
    if avg.quorum and not avg.synchronous:
      never_acts("codistill.averaging.quorum", avg.quorum, "asynchronous "
                 "averaging never waits for peers", "set it to 0, or "
                 "config.codistill.averaging.synchronous=True")

  def __init__(self, ctx: Context):
    super().__init__(ctx)
    config, setup = ctx.config, ctx.setup
    avg = config.codistill.averaging
    self.synchronous = avg.synchronous
    # Peers of this very step wait for it: commit it before going on.
    self.publish_blocking = self.synchronous
    if self.synchronous:  # Wait until every peer has published this step.
      self.max_staleness = self.every - 1
    self.quorum, self.grace_s = avg.quorum, avg.grace_s
    outer = averaging.make_outer_tx(config.codistill)
    repl = mesh_lib.replicated(setup.mesh)
    self._outer = jax.jit(averaging.make_outer_step(outer),
                          in_shardings=(setup.state_sharding,
                                        self.reader.sharding),
                          out_shardings=setup.state_sharding,
                          donate_argnums=(0,))
    self._drift = jax.jit(averaging.drift, out_shardings=repl)
    self._drifts: list = []
    self.averaged_with = 0.0  # Peers in the newest average.

  @classmethod
  def layout(cls, config, setup, batch, group=0):
    del config, setup, batch, group
    return Layout()

  def step_args(self, step):
    del step
    if self._wall0 is None:
      self._wall0 = time.time()
    return ()

  def refresh(self, step):
    if not cadence.is_time(step, self.every):
      return
    if self.joinable:
      self._timed(self._discover)
    if self.synchronous:
      self._timed(self._wait_for_quorum if self.quorum else
                  self._wait_for_peers, step)
      self._timed(self.reader.restore_at, step)
    else:
      self._timed(self.reader.refresh, block=False)

  def _wait_for_quorum(self, step: int) -> None:
    """Waits for the peers' params of `step`: until every live peer's are
    there, or `grace_s` after `quorum` groups (this one included) are, or
    `peer_timeout_s` (then it goes on with whoever arrived)."""
    t0, reached, checked = time.time(), None, time.time()
    while True:
      newest = self.reader.newest_published()
      if time.time() - checked > 2.0:  # Has one left the run?
        checked = time.time()
        self._mark_left()
      live = [h for h in newest if h not in self._left]
      here = [h for h in live if newest[h] >= step]
      if reached is None and len(here) + 1 >= self.quorum:
        reached = time.time()
      if (len(here) == len(live) or storage_lib.stop_requested() or
          (reached is not None and time.time() - reached >= self.grace_s)):
        break
      if time.time() - t0 > self.peer_timeout_s:
        logging.warning("group %d: only %d of the %d groups at step %d "
                        "after %.0f s (config.codistill.peer_timeout_s; "
                        "quorum %d): averaging with those", self.group,
                        len(here) + 1, len(live) + 1, step, time.time() - t0,
                        self.quorum)
        break
      time.sleep(0.05)
    if len(here) < len(live):
      logging.info("group %d averages step %d with %d of its %d peers "
                   "(quorum %d, grace %.1f s; missing %s)", self.group, step,
                   len(here), len(live), self.quorum, self.grace_s,
                   sorted(set(live) - set(here)))
    self.waited_s += time.time() - t0

  def update(self, step, state):
    if not cadence.is_time(step, self.every):
      return state
    peers, held = self.reader.snapshot()  # One moment: weights and steps.
    if self.synchronous:  # Only peers of this step (not ones given up).
      peers = peers.replace(weights=jnp.asarray(
          [held[s.group] == step for s in self.reader.slots], jnp.float32))
    self._drifts.append(self._drift(state, peers))
    self.averaged_with = float(sum(
        h is not None and (not self.synchronous or h == step)
        for h in held.values()))
    return self._timed(self._outer, state, peers)

  def metrics(self, step):
    """The exchange's (see Peers) and, per average in the window, the RMS
    distance of the peers' params from the group's before it."""
    out = super().metrics(step)
    if self._drifts:
      out["averaging/drift"] = float(np.mean(jax.device_get(self._drifts)))
      self._drifts.clear()
    out["averaging/peers"] = self.averaged_with
    return out


def teacher_weights(weighting: str, held: list[int | None], step: int,
                    every: int, val_losses: list[float | None],
                    temperature: float) -> np.ndarray:
  """Each peer's weight in the target (normalised by the loss), 0 for one
  whose params are not held yet.

  Args:
    weighting: one of WEIGHTINGS. 'uniform': 1 each. 'freshness':
      1 / (1 + staleness / every), staleness = step - the held step.
      'val_loss': softmax(-loss / temperature) over the held peers, by the
      validation loss each published with its params; uniform until every
      held peer has one.
    held: per peer, the step of the params held (None: none yet).
    step: the step the update starts from.
    every: the reading group's exchange interval.
    val_losses: per peer, the validation loss published with them, or None.
    temperature: of the 'val_loss' softmax.
  """
  has = np.array([h is not None for h in held], np.float64)
  if weighting == "uniform":
    return has
  if weighting == "freshness":
    age = np.array([step - h if h is not None else 0 for h in held],
                   np.float64)
    return has / (1.0 + np.maximum(age, 0.0) / every)
  known = [l is not None and np.isfinite(l) for l in val_losses]
  if not all(k for k, h in zip(known, has) if h):
    return has
  z = np.array([-l / temperature if k else -np.inf
                for l, k in zip(val_losses, known)])
  z = np.where(has > 0, z, -np.inf)
  if not has.any():
    return has
  return np.exp(z - np.max(z))


@dataclasses.dataclass(frozen=True)
class PeerSet:
  """A group's peers of one architecture: stacked and run as one."""
  peers: tuple[int, ...]
  model: Any  # Their Flax module.
  abstract: Any  # Their params, laid out on the reading group's mesh.


def architecture(config, group: int) -> tuple[str, dict]:
  """(model name, model fields) of group `group` of the run `config`."""
  own = config_lib.group_config(config, group)
  return own.model_name, own.model.to_dict()


def _arch_key(arch: tuple[str, dict]) -> str:
  return json.dumps(arch, sort_keys=True, default=str)


def peer_sets(config, group: int, setup: build.Setup,
              archs: dict[int, tuple[str, dict]] | None = None
              ) -> list[PeerSet]:
  """Group `group`'s peers, one `PeerSet` per architecture.

  Peers of the group's own architecture come first and use its own layout
  (the one set of a run of identical groups: the step is as it always was);
  each other architecture is built from the data's info and laid out on the
  group's mesh by its sharding rules.

  Args:
    config: the run's config.
    group: the reading group.
    setup: the reading group's.
    archs: {peer: (model name, fields)}; default every other group started,
      by its config.
  """
  if archs is None:
    archs = {h: architecture(config, h)
             for h in range(config.codistill.num_groups) if h != group}
  own = config_lib.group_config(config, group)
  mine = _arch_key(architecture(config, group))
  by_arch: dict[str, list[int]] = {}
  for h in sorted(archs):
    by_arch.setdefault(_arch_key(archs[h]), []).append(h)
  out = []
  for key, hs in sorted(by_arch.items(), key=lambda kv: (kv[0] != mine,
                                                         kv[1][0])):
    if key == mine:
      out.append(PeerSet(tuple(hs), setup.model, setup.abstract.params))
      continue
    name, fields = archs[hs[0]]
    fields = {k: tuple(v) if isinstance(v, list) else v
              for k, v in fields.items()}
    model = models.build(name, fields, setup.info)
    params = jax.eval_shape(lambda m=model: m.init(
        jax.random.PRNGKey(0), setup.example, train=False))
    shardings = mesh_lib.tree_shardings(
        setup.mesh, {"params": params}, own.sharding.rules,
        own.sharding.fsdp_min_size)["params"]
    out.append(PeerSet(tuple(hs), model,
                       build.with_shardings(params, shardings)))
  return out


def _peers_layout(own, sets: list[PeerSet]) -> Layout:
  """The step of a group reading `sets`: one stacked `Teachers` per
  architecture (a tuple of them when there are several)."""
  if not sets:
    return Layout()
  dtype = own.codistill.teacher_dtype
  stacked = [stacked_layout(ps.abstract, len(ps.peers), dtype) for ps in sets]
  if len(sets) == 1:
    return Layout(distills=True, teacher=sets[0].model, args=(stacked[0],))
  return Layout(distills=True, teacher=tuple(ps.model for ps in sets),
                args=(tuple(stacked),))


def stacked_layout(abstract_params, n: int, dtype) -> step_lib.Teachers:
  """Abstract stacked teachers laid out like `abstract_params` (+ an axis)."""
  sharding = exchange.teachers_sharding(
      jax.tree.map(lambda a: a.sharding, abstract_params))
  return build.stacked(abstract_params, n, dtype, sharding)


# ----------------------------------------------------------------------------
# A fixed teacher in this process.
# ----------------------------------------------------------------------------
class FromCheckpoint(Source):
  """Two-phase distillation: a trained checkpoint of any architecture.

  The teacher is `build.teacher_model(config)`; its params are restored
  onto the group's mesh, replicated, and cast to `teacher_dtype`.
  """

  distills = True

  def __init__(self, ctx: Context):
    config, setup = ctx.config, ctx.setup
    cd = config.codistill
    repl = mesh_lib.replicated(setup.mesh)
    teacher, abstract = build.fixed_teacher(config, setup.info, setup.example,
                                            repl)
    params = ckpt_lib.restore_params(
        cd.teacher_checkpoint, abstract,
        field="config.codistill.teacher_checkpoint")
    name, kwargs = build.teacher_spec(config)
    logging.info("teacher: %s, model %s %s, %d params, as %s",
                 ckpt_lib.find_step_dir(cd.teacher_checkpoint,
                                        "config.codistill.teacher_checkpoint"),
                 name, kwargs, sum(x.size for x in jax.tree.leaves(params)),
                 cd.teacher_dtype)
    dtype = jnp.dtype(cd.teacher_dtype)
    self.teachers = jax.jit(
        lambda p: step_lib.Teachers(
            jax.tree.map(lambda x: x.astype(dtype)[None], p),
            jnp.ones((1,), jnp.float32)), out_shardings=repl)(params)

  @classmethod
  def check_config(cls, config):
    cd = config.codistill
    _need_teacher_checkpoint(config)
    if cd.sampled.num_samples and cd.teacher_model_name:
      # Sampled distillation reaches into the teacher's output layer too.
      models.check_sampled_head(cd.teacher_model_name,
                                "config.codistill.teacher_model_name",
                                cd.sampled.num_samples)

  @classmethod
  def layout(cls, config, setup, batch, group=0):
    del batch
    config = config_lib.group_config(config, group)
    # The checkpoint is not read: its architecture's shapes are what count.
    teacher, abstract = build.fixed_teacher(config, setup.info,
                                            setup.example,
                                            mesh_lib.replicated(setup.mesh))
    return Layout(distills=True, teacher=teacher, args=(stacked_layout(
        abstract, 1, config.codistill.teacher_dtype),))

  def step_args(self, step):
    del step
    return (self.teachers,)


# ----------------------------------------------------------------------------
# Targets in the batch: the service and the store.
# ----------------------------------------------------------------------------
class Targets(Source):
  """A teacher's targets arrive in `batch['teacher']` (dense probabilities
  or top-k); the teacher never runs in the step."""

  distills = True

  @classmethod
  def check_config(cls, config):
    cd, name = config.codistill, cls.describe
    if cd.divergence not in ("kl", "xent"):
      raise ConfigError(f"config.codistill.divergence={cd.divergence!r}: the "
                        f"{name} sends probabilities, not logits; use 'kl' or "
                        "'xent'")
    if cd.sampled.num_samples:
      raise ConfigError(
          f"config.codistill.sampled.num_samples={cd.sampled.num_samples}: "
          f"the {name} sends probabilities, not the teacher's hidden states; "
          "sampled distillation needs its teachers in this process "
          "(teacher_source 'peers' or 'checkpoint'); use "
          "config.codistill.topk (or set num_samples=0)")

  @classmethod
  def layout(cls, config, setup, batch, group=0):
    """The step of targets in `batch['teacher']`: dense probs or top-k."""
    config = config_lib.group_config(config, group)
    logits = jax.eval_shape(
        lambda p, x: setup.model.apply(p, x, train=False),
        setup.abstract.params, batch["inputs"])
    sharding = mesh_lib.batch_sharding(setup.mesh)
    k = config.codistill.topk
    if not k:
      shapes = {"probs": (logits.shape, jnp.float32)}
    else:
      shape = (*logits.shape[:-1], k)
      shapes = {"topk_ids": (shape, jnp.int32),
                "topk_probs": (shape, jnp.float32)}
    return Layout(distills=True, batch={"teacher": {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        for name, (shape, dtype) in shapes.items()}})


# ----------------------------------------------------------------------------
# The teacher service (EDL-Dist).
# ----------------------------------------------------------------------------
class FromService(Targets):
  """Targets from a pool of Ray workers serving the teacher checkpoint.

  One service per job, shared by its groups (`Context.shared`); each
  group's batches go through its own ordered, retrying
  `service.TargetReader`.
  """

  describe = "teacher service"

  def __init__(self, ctx: Context):
    if "service" not in ctx.shared:
      # Ray is an optional extra: imported only for this source.
      try:
        from codistill_jax.service import serving  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        if e.name != "ray":
          raise
        raise ConfigError("config.codistill.teacher_source='service' needs "
                          "Ray: pip install -e .[service]") from None
      # A teacher of another task is refused here, before workers start.
      build.fixed_teacher(ctx.config, ctx.setup.info, ctx.setup.example,
                          mesh_lib.replicated(ctx.setup.mesh))
      ctx.shared["service"] = serving.start(
          ctx.config, ctx.setup.info, next(iter(ctx.datasets.train(0))))
    self.service = ctx.shared["service"]
    self.reader = None

  @classmethod
  def check_config(cls, config):
    super().check_config(config)
    _need_teacher_checkpoint(config)
    if importlib.util.find_spec("ray") is None:
      raise ConfigError("config.codistill.teacher_source='service' needs "
                        "Ray: pip install -e .[service]")
    # pylint: disable-next=g-import-not-at-top
    from codistill_jax.service import reader  # Ray is there (checked above).
    config_lib.check_choice(config, "codistill.service.no_worker",
                            reader.NO_WORKER_POLICIES)

  def wrap(self, batches):
    self.reader = self.service.reader(batches)
    return self.reader

  def metrics(self, step):
    del step
    return self.reader.metrics() if self.reader is not None else {}

  def close(self):
    if self.reader is not None:
      self.reader.close()


# ----------------------------------------------------------------------------
# Stored targets.
# ----------------------------------------------------------------------------
class FromStore(Targets):
  """Targets written once by `codistill_jax.tools.store_targets`, read by
  example id.

  Each batch's rows are looked up by their 'index' in the training split, so
  any group, shard or resumed step reads the targets of its own examples.
  """

  describe = "target store"

  def __init__(self, ctx: Context):
    from codistill_jax import target_store  # pylint: disable=g-import-not-at-top
    config = ctx.config
    self.store = target_store.TargetStore(config.codistill.stored_targets)
    self.store.check(config, ctx.datasets)
    self.looked_up = 0

  @classmethod
  def check_config(cls, config):
    super().check_config(config)
    cd = config.codistill
    if not cd.stored_targets:
      raise ConfigError("config.codistill.teacher_source='stored' needs "
                        "config.codistill.stored_targets=<dir written by "
                        "python -m codistill_jax.tools.store_targets>")
    if not os.path.isdir(cd.stored_targets):
      raise ConfigError(f"config.codistill.stored_targets="
                        f"{cd.stored_targets}: no such directory")

  def wrap(self, batches):
    for batch in batches:
      self.looked_up += 1
      yield {**batch, "teacher": self.store.lookup(batch["index"])}

  def metrics(self, step):
    del step
    return {"stored/batches": float(self.looked_up)}


SOURCES = {"peers": Peers, "checkpoint": FromCheckpoint,
           "service": FromService, "stored": FromStore}
METHODS = ("distill", "average")  # config.codistill.method.


def source_class(config) -> type[Source]:
  """The class of a group's source: the one place that reads which."""
  cd = config.codistill
  if cd.teacher_source == "peers":
    if cd.num_groups == 1:
      return NoTeachers
    return Averaging if cd.method == "average" else Peers
  return SOURCES[cd.teacher_source]


def layout(config, setup: build.Setup, batch: dict, group: int = 0) -> Layout:
  """What group `group`'s train step takes under `config`'s source (no
  reads); `config` is the run's (`config.group` included)."""
  return source_class(config).layout(config, setup, batch, group)


class Sources:
  """The sources of the groups one job drives, and what they share."""

  def __init__(self, config, storage, total_steps: int):
    self.config, self.storage, self.total = config, storage, total_steps
    self.cls = source_class(config)
    self.publishes = self.cls.publishes  # Whether groups publish params.
    self.shared_init = self.cls.shared_init  # Whether they start alike.
    self._shared: dict[str, Any] = {}
    self._made: list[Source] = []

  def layout(self, setup: build.Setup, batch: dict, group: int = 0) -> Layout:
    return self.cls.layout(self.config, setup, batch, group)

  def make(self, group: int, setup: build.Setup, datasets, params: Any):
    """Group `group`'s source, for its initial `params`.

    Reads only: nothing is written here.
    """
    source = self.cls(Context(
        config_lib.group_config(self.config, group), group, setup, datasets,
        params, self.storage, self.total, self._shared, self.config))
    self._made.append(source)
    return source

  def close(self) -> None:
    for source in self._made:
      source.close()
    if "service" in self._shared:
      self._shared.pop("service").close()


# ----------------------------------------------------------------------------
# Validation of config.codistill's teacher fields.
# ----------------------------------------------------------------------------
def check_config(config) -> None:
  """teacher_source, method, the exchange, and what the chosen source needs
  (its own `check_config`)."""
  cd = config.codistill
  config_lib.check_choice(config, "codistill.teacher_source", SOURCES)
  config_lib.check_choice(config, "codistill.method", METHODS)
  if cd.method == "average":
    if cd.teacher_source != "peers":
      raise ConfigError(
          f"config.codistill.method='average' averages the groups' own "
          f"params; it needs config.codistill.teacher_source='peers', not "
          f"{cd.teacher_source!r} (or method='distill' to distil from it)")
  # Checked with any method, like every choice: a typo is refused at once.
  config_lib.check_choice(config, "codistill.averaging.outer_optimizer",
                          averaging.OUTER_OPTIMIZERS)
  config_lib.check_choice(config, "codistill.teacher_dtype", TEACHER_DTYPES)
  config_lib.check_choice(config, "codistill.teacher_weighting", WEIGHTINGS)
  config_lib.check_choice(config, "codistill.join_init", JOIN_INITS)
  config_lib.check_choice(config, "codistill.exchange_format",
                          exchange.FORMATS)
  if cd.exchange_format == "blob" and jax.process_count() > 1:
    raise ConfigError("config.codistill.exchange_format='blob' needs every "
                      "param in one process; a job of several processes "
                      "publishes with 'orbax' (or 'auto')")
  if cd.max_staleness and cd.max_staleness < cd.exchange_every:
    raise ConfigError(f"config.codistill.max_staleness={cd.max_staleness} is "
                      f"below config.codistill.exchange_every="
                      f"{cd.exchange_every}: a teacher is that old just "
                      "before each exchange anyway; use at least "
                      f"{cd.exchange_every} (or 0 for no bound)")
  cls = source_class(config)
  if cls.distills and cd.alpha > 0:
    if cd.burn_in_steps >= config.total_steps:
      never_acts("codistill.burn_in_steps", cd.burn_in_steps,
                 f"it is not shorter than config.total_steps="
                 f"{config.total_steps}: alpha would stay 0 and nothing "
                 "would be distilled", "use a shorter burn-in")
    if cd.burn_in_steps + cd.alpha_ramp_steps > config.total_steps:
      acts_in_part("codistill.alpha_ramp_steps", cd.alpha_ramp_steps,
                   f"alpha reaches only "
                   f"{(config.total_steps - cd.burn_in_steps) / max(cd.alpha_ramp_steps, 1):.0%}"
                   f" of config.codistill.alpha={cd.alpha} by the end of the run")
  if cd.teacher_checkpoint and "://" not in cd.teacher_checkpoint and (
      not os.path.exists(cd.teacher_checkpoint)):
    raise ConfigError(f"config.codistill.teacher_checkpoint="
                      f"{cd.teacher_checkpoint}: no such directory")
  cls.check_config(config)


def check_groups(config) -> None:
  """What groups that differ (`config.group`) need of each other: one
  method's rules, joiners a source that reads peers (no jax needed)."""
  cd = config.codistill
  cls = source_class(config)
  n, top = cd.num_groups, config_lib.max_groups(config)
  if top > n and not cls.publishes:
    raise ConfigError(
        f"config.codistill.max_groups={cd.max_groups}: groups join a run "
        "through the peers' exchange; it needs config.codistill."
        "teacher_source='peers' and num_groups of at least 2")
  if cd.join_warmup_steps and top == n:
    never_acts("codistill.join_warmup_steps", cd.join_warmup_steps,
               "no group can join (config.codistill.max_groups is not above "
               "num_groups)", "set it to 0, or raise max_groups")
  archs = {_arch_key(architecture(config, 0)): 0}
  for g in config_lib.set_groups(config):
    over = config_lib.group_overrides(config, g)
    name = f"config.group.{config_lib.group_key(g)}"
    if cls is Averaging:
      changed = sorted(k for k in over if k.split(".")[0] in (
          "model_name", "model") or k == "codistill.exchange_every")
      if changed:
        raise ConfigError(
            f"{name}.{changed[0]}: parameter averaging "
            "(config.codistill.method='average') needs every group to be "
            "the same model on the same exchange interval; codistill "
            "(method='distill') groups that differ")
    archs.setdefault(_arch_key(architecture(config, g)), g)
  if len(archs) > 1 and cd.sampled.num_samples:
    first, other = sorted(archs.values())[:2]
    raise ConfigError(
        f"groups {first} and {other} are different models: sampled "
        "distillation (config.codistill.sampled.num_samples) needs peers of "
        "one architecture; set num_samples=0 or give the groups one model")


def join_params(config, group: int, setup: build.Setup, storage):
  """A joining group's first params by `codistill.join_init`: None (its own
  init: 'scratch', or 'peer' with no peer of its architecture published
  yet), or the newest published params of a peer of its architecture."""
  own = config_lib.group_config(config, group)
  if own.codistill.join_init != "peer":
    logging.info("group %d joins the run from scratch", group)
    return None
  mine = _arch_key(architecture(config, group))
  members = exchange.read_members(storage.run_dir)
  same = [h for h, r in sorted(members.items()) if h != group and
          _arch_key((r.get("model_name"), r.get("model") or {})) == mine]
  if not same:
    logging.warning("group %d joins from scratch: no peer of its "
                    "architecture has published (config.codistill."
                    "join_init='peer')", group)
    return None
  reader = exchange.PeerReader(storage.run_dir, same, setup.abstract.params,
                               jnp.float32, run=storage.run)
  try:
    reader.refresh(block=True)
    held = reader.held_steps()
    best = max((h for h in same if held[h] is not None),
               key=lambda h: held[h], default=None)
    if best is None:
      logging.warning("group %d joins from scratch: its peers %s have "
                      "published nothing yet", group, same)
      return None
    teachers, _ = reader.snapshot()
    i = same.index(best)
    logging.info("group %d joins from peer %d's params of step %d", group,
                 best, held[best])
    return jax.device_put(jax.tree.map(lambda x: x[i], teachers.params),
                          setup.state_sharding.params)
  finally:
    reader.close()


def check_output_spaces(config, outputs: dict[int, tuple]) -> None:
  """Groups share one output space: `outputs` is {group: the shape of its
  model's logits on one example}; a difference names both groups and the
  fields that make it."""
  first = min(outputs)
  for g, shape in sorted(outputs.items()):
    if tuple(shape) != tuple(outputs[first]):
      fields = [f"config.group.{config_lib.group_key(h)}.{k}"
                for h in (first, g)
                for k in config_lib.group_overrides(config, h)
                if k.split(".")[0] in ("model_name", "model")]
      raise ConfigError(
          f"groups {first} and {g} do not share an output space: group "
          f"{first}'s model predicts {tuple(outputs[first])}, group {g}'s "
          f"{tuple(shape)} ({', '.join(fields) or 'their model fields'}); "
          "groups distil each other's predictions, so they need the same "
          "classes (vocabulary and tokenizer for LMs)")


def never_acts(field: str, value, why: str, fix: str) -> None:
  """The one rule for a setting under which its feature never acts in the
  run: refused, naming the field (see docs/codistillation.md)."""
  raise ConfigError(f"config.{field}={value} never acts: {why}; {fix}")


def acts_in_part(field: str, value, what: str) -> None:
  """...and for one under which it acts only in part: one warning at start."""
  logging.warning("config.%s=%s acts only in part: %s", field, value, what)


def _need_teacher_checkpoint(config) -> None:
  cd = config.codistill
  if not cd.teacher_checkpoint:
    raise ConfigError(f"config.codistill.teacher_source="
                      f"{cd.teacher_source!r} needs "
                      "config.codistill.teacher_checkpoint=<run dir>")

"""The host loop: `train_and_evaluate(config, workdir)`, top to bottom.

G groups train at once. This job drives the groups whose devices it owns: all
of them in a plain single-process run or a multi-host job (every group then
spans all processes: `mesh.group_devices`), or the ones named by `groups` when
each group (or a few) runs as its own job. Per group: its disjoint data shard,
its state created sharded on its own sub-mesh, its own checkpoints and logs
under `workdir/group_<g>/`. Dispatch is asynchronous, so groups on disjoint
devices run concurrently.

Groups meet only through files: every `codistill.exchange_every` steps a group
publishes its params (`exchange.Publisher`) and starts reloading its peers'
newest committed ones in the background (`exchange.PeerReader`); its train
step distils towards the mean of their predictions. One group, or alpha = 0,
is the synchronous data-parallel baseline: the same loop and step.
"""

import dataclasses
import functools
import signal
import threading
import time
from typing import Any, Callable, Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from codistill_jax import checkpoint as ckpt_lib
from codistill_jax import config_lib
from codistill_jax import data as data_lib
from codistill_jax import exchange
from codistill_jax import losses
from codistill_jax import mesh as mesh_lib
from codistill_jax import metrics as metrics_lib
from codistill_jax import models as models_lib
from codistill_jax import optim
from codistill_jax import sampling
from codistill_jax import step as step_lib
from codistill_jax.errors import ConfigError


# How many steps the host may dispatch ahead of the devices.
MAX_STEPS_AHEAD = 2


def is_time(step: int, every: int, total: int | None = None) -> bool:
  """The one 'is it time to X' rule: every `every` steps, and at the end."""
  return (every > 0 and step > 0 and step % every == 0) or step == total


# ----------------------------------------------------------------------------
# Building blocks (no loop state).
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Setup:
  """A group's model, optimizer and abstract state, sharded on its mesh."""
  model: Any
  tx: Any
  lr_fn: Callable
  init_fn: Callable  # rng -> TrainState; jit it with out_shardings.
  abstract: Any  # TrainState of ShapeDtypeStructs carrying the shardings.
  state_sharding: Any
  info: Any = None  # The dataset's info (vocab_size, unigram counts, ...).


def _example_inputs(batch):
  """One-example zeros with the batch's per-example shapes (for init)."""
  return jax.tree.map(lambda x: np.zeros((1,) + x.shape[1:], x.dtype),
                      batch["inputs"])


def _with_shardings(abstract, shardings):
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)


def build(config: ml_collections.ConfigDict, datasets, mesh) -> Setup:
  """Model, optimizer and state layout for `config` on `mesh` (no compute)."""
  model = models_lib.build(config.model_name, config.model.to_dict(),
                           datasets.info)
  tx, lr_fn = optim.make_optimizer(config.optimizer, config.total_steps)
  example = _example_inputs(next(iter(datasets.train(0))))
  init_fn = functools.partial(step_lib.init_state, model, tx,
                              example_inputs=example)
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  state_sharding = mesh_lib.tree_shardings(
      mesh, abstract, config.sharding.rules, config.sharding.fsdp_min_size)
  return Setup(model, tx, lr_fn, init_fn,
               _with_shardings(abstract, state_sharding), state_sharding,
               datasets.info)


def jit_train_step(config: ml_collections.ConfigDict, setup: Setup, mesh,
                   distill_apply: Callable | None = None,
                   teacher_sharding: Any = None, precomputed: bool = False):
  """A group's train step, jitted with its shardings (compiled on first use).

  With `distill_apply` (the teachers' apply function) the step takes stacked
  `Teachers` laid out as `teacher_sharding` as its third argument; with
  `precomputed` (the teacher service) it distils from `batch['teacher']`. The
  trainer calls it and so does `compile_check`, which lowers the very same
  program ahead of time.
  """
  cd = config.codistill
  loss_fn = step_lib.make_loss_fn(losses.task_loss(config.loss))
  distill = None
  in_shardings = (setup.state_sharding, mesh_lib.batch_sharding(mesh))
  if distill_apply is not None or precomputed:
    distill = step_lib.Distill(
        distill_apply,
        losses.alpha_schedule(cd.alpha, cd.burn_in_steps, cd.alpha_ramp_steps),
        divergence=cd.divergence, temperature=cd.temperature,
        binary=config.loss == "sigmoid_xent", topk=cd.topk,
        topk_mode=cd.topk_mode,
        sampled=sampled_head(config, setup, distill_apply))
    if distill_apply is not None:
      in_shardings += (teacher_sharding,)
  return jax.jit(
      step_lib.make_train_step(setup.model.apply, loss_fn, setup.tx,
                               setup.lr_fn, distill),
      in_shardings=in_shardings,
      out_shardings=(setup.state_sharding, mesh_lib.replicated(mesh)),
      donate_argnums=(0,))


def sampled_head(config, setup: Setup, teacher_apply: Callable | None):
  """The `sampling.SampledHead` of config.codistill.sampled (None if off).

  `teacher_apply` is the teachers' Flax `Module.apply`; the teacher module
  (the student's own architecture for peers) provides `hidden` and
  `output_embedding`.
  """
  sm = config.codistill.sampled
  if not sm.num_samples or teacher_apply is None:
    return None
  student = setup.model
  teacher = getattr(teacher_apply, "__self__", student)
  vocab = student.output_embedding(setup.abstract.params)[0].shape[-1]
  if sm.num_samples > vocab:
    raise ConfigError(f"config.codistill.sampled.num_samples={sm.num_samples}"
                      f" exceeds the {vocab} output classes; use at most "
                      f"{vocab}")
  unigram = None
  if sm.proposal == "unigram":
    if "unigram" not in (setup.info or {}):
      raise ConfigError("config.codistill.sampled.proposal='unigram': data "
                        f"{config.data.name!r} gives no class counts; use "
                        "'dynamic'")
    unigram = np.asarray(setup.info["unigram"], np.float32)

  def hidden_fn(module):
    return lambda p, x, train=False, rngs=None: module.apply(
        p, x, train=train, rngs=rngs, method="hidden")

  return sampling.SampledHead(
      hidden_fn=hidden_fn(student), output_embedding=student.output_embedding,
      teacher_hidden_fn=hidden_fn(teacher),
      teacher_output_embedding=teacher.output_embedding,
      num_samples=sm.num_samples, proposal=sm.proposal,
      prior_mix=sm.prior_mix, uniform_mix=sm.uniform_mix,
      proposal_positions=sm.proposal_positions, unigram=unigram,
      task_loss=sm.task_loss)


def fixed_teacher(config, datasets, mesh):
  """Two-phase distillation: (apply_fn, Teachers) of a trained checkpoint.

  The teacher may be another architecture (`codistill.teacher_model_name`
  and `teacher_model`); its params are restored onto `mesh`, replicated.
  """
  cd = config.codistill
  name = cd.teacher_model_name or config.model_name
  kwargs = (cd.teacher_model.to_dict() if cd.teacher_model_name
            else config.model.to_dict())
  teacher = models_lib.build(name, kwargs, datasets.info)
  example = _example_inputs(next(iter(datasets.train(0))))
  abstract = jax.eval_shape(
      lambda: teacher.init(jax.random.PRNGKey(0), example, train=False))
  repl = mesh_lib.replicated(mesh)
  params = ckpt_lib.restore_params(
      cd.teacher_checkpoint,
      _with_shardings(abstract, jax.tree.map(lambda _: repl, abstract)))
  dtype = jnp.dtype(cd.teacher_dtype)
  stack = jax.jit(
      lambda p: step_lib.Teachers(
          jax.tree.map(lambda x: x.astype(dtype)[None], p),
          jnp.ones((1,), jnp.float32)), out_shardings=repl)
  return teacher.apply, stack(params)


def teacher_service(config, datasets):
  """The teacher-inference service (teacher_source='service').

  Imported here only: Ray is an optional extra and the core never needs it.
  """
  try:
    from codistill_jax import service  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if e.name != "ray":
      raise
    raise ConfigError("config.codistill.teacher_source='service' needs Ray: "
                      "pip install -e .[service]") from None
  return service.start(config, datasets.info, next(iter(datasets.train(0))))


def _check_finite(step: int, scalars: dict, last_saved: int | None, g: int):
  bad = {k: v for k, v in scalars.items() if not np.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"group {g}: {bad} at step {step}; the last good checkpoint is step "
        f"{last_saved}. Lower config.optimizer.learning_rate or set "
        "config.optimizer.grad_clip_norm")


class _Preemption:
  """SIGTERM -> a flag the loop checks each step: save, then exit cleanly.

  In a multi-process job all processes must stop at the same step, so there
  the decision comes from JAX's preemption sync point instead.
  """

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    # Multi-process: JAX's preemption notifier catches SIGTERM (a Python
    # handler here would replace it, and the sync point would never come).
    if (jax.process_count() == 1 and
        threading.current_thread() is threading.main_thread()):
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint and exiting.")
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


@dataclasses.dataclass
class Group:
  """Everything the loop holds for one group this job drives."""
  index: int
  datasets: Any
  state: Any
  train_step: Callable
  eval_step: Callable
  predict_step: Callable
  batch_sharding: Any
  checkpointer: ckpt_lib.Checkpointer
  writer: metrics_lib.MetricWriter
  publisher: exchange.Publisher | None = None
  reader: exchange.PeerReader | None = None
  fixed_teachers: Any = None
  service: Any = None  # service.Service: targets arrive in the batches.
  batches: Iterator | None = None
  pending: list = dataclasses.field(default_factory=list)  # Device metrics.
  last_saved: int | None = None
  exchange_blocked_s: float = 0.0  # Host time spent in the exchange.

  def teachers(self):
    if self.reader is not None:
      t = time.perf_counter()
      teachers = self.reader.teachers()
      self.exchange_blocked_s += time.perf_counter() - t
      return teachers
    return self.fixed_teachers


def _process_slot(procs: list[int]) -> tuple[int, int]:
  """(index, count) of this process among the processes of a group."""
  return procs.index(jax.process_index()), len(procs)


# ----------------------------------------------------------------------------
# Train and evaluate.
# ----------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       groups: list[int] | None = None) -> dict:
  """Trains this job's groups (default: all G); returns final eval metrics.

  Args:
    config: the experiment config (validated here again).
    workdir: checkpoints, logs and, by default, the exchange directory.
    groups: the groups this job runs; the others are peers met only through
      the exchange directory (separate processes or jobs).
  """
  # --------------------------------------------------------------------------
  # Validate everything before compiling or writing anything.
  # --------------------------------------------------------------------------
  cd = config.codistill
  num_groups = cd.num_groups
  groups = list(range(num_groups)) if groups is None else sorted(set(groups))
  if not groups or not all(0 <= g < num_groups for g in groups):
    raise ConfigError(f"--groups={groups} must name groups in "
                      f"0..{num_groups - 1} (config.codistill.num_groups)")
  config_lib.validate(config, num_groups_here=len(groups))
  ckpt_lib.check_workdir(workdir, config)
  data_module = data_lib.get_module(config.data.name)
  devices = dict(zip(groups, mesh_lib.group_devices(len(groups))))
  procs_of = {g: sorted({d.process_index for d in devices[g]}) for g in groups}
  owned = [g for g in groups if jax.process_index() in procs_of[g]]
  exchange_dir = cd.exchange_dir or workdir
  use_peers = cd.teacher_source == "peers" and num_groups > 1

  metrics_fn = metrics_lib.eval_metrics_fn(config.loss)
  predictions_fn = metrics_lib.predictions_fn(config.loss)

  # --------------------------------------------------------------------------
  # Per group: data shard, model, state created sharded on its sub-mesh,
  # teachers, and the compiled steps.
  # --------------------------------------------------------------------------
  run: list[Group] = []
  teachers_service = None  # One per job, shared by its groups.
  for g in owned:
    mesh = mesh_lib.make_mesh(devices[g])
    proc, nproc = _process_slot(procs_of[g])
    datasets = data_module.get_datasets(
        config, group=g, num_groups=num_groups, process_index=proc,
        process_count=nproc)
    setup = build(config, datasets, mesh)
    data_sharding = mesh_lib.batch_sharding(mesh)
    repl = mesh_lib.replicated(mesh)

    # Resume order: own checkpoint, then config.init_checkpoint, then scratch.
    checkpointer = ckpt_lib.Checkpointer(
        f"{workdir}/group_{g}/checkpoints", config.keep_checkpoints,
        name=f"state_g{g}")
    start = checkpointer.latest_step()
    if start is not None:
      state = checkpointer.restore(start, setup.abstract)
      logging.info("group %d: resumed from its own checkpoint at step %d",
                   g, start)
    else:
      # Every group starts from its own seed; retrains differ in config.seed.
      rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), g)
      state = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(rng)
      if config.init_checkpoint:
        state = state.replace(params=ckpt_lib.restore_params(
            config.init_checkpoint, setup.abstract.params))
        logging.info("group %d: params from %s", g, config.init_checkpoint)

    grp_kwargs = {}
    distill_apply = teacher_sharding = None
    if use_peers:
      peers = [h for h in range(num_groups) if h != g]
      reader = exchange.PeerReader(exchange_dir, peers, setup.abstract.params,
                                   cd.teacher_dtype)
      # A resumed group picks up what its peers published; with the blocking
      # exchange before its first step, so that a resumed run is exact.
      reader.refresh(block=cd.exchange_blocking)
      publisher = exchange.Publisher(exchange_dir, g)
      publisher.warm_up(state.params)
      grp_kwargs.update(reader=reader, publisher=publisher)
      distill_apply, teacher_sharding = setup.model.apply, reader.sharding
    elif cd.teacher_source == "checkpoint":
      distill_apply, fixed = fixed_teacher(config, datasets, mesh)
      grp_kwargs.update(fixed_teachers=fixed)
      teacher_sharding = jax.tree.map(lambda x: x.sharding, fixed)
    elif cd.teacher_source == "service":
      teachers_service = teachers_service or teacher_service(config, datasets)
      grp_kwargs.update(service=teachers_service)
    train_step = jit_train_step(config, setup, mesh, distill_apply,
                                teacher_sharding,
                                precomputed=cd.teacher_source == "service")
    eval_step = jax.jit(
        step_lib.make_eval_step(setup.model.apply, metrics_fn),
        in_shardings=(setup.state_sharding.params, data_sharding),
        out_shardings=repl)
    predict_step = jax.jit(
        step_lib.make_eval_step(setup.model.apply, predictions_fn),
        in_shardings=(setup.state_sharding.params, data_sharding),
        out_shardings=repl)
    writer = metrics_lib.MetricWriter(f"{workdir}/group_{g}",
                                      enabled=proc == 0)
    run.append(Group(g, datasets, state, train_step, eval_step, predict_step,
                     data_sharding, checkpointer, writer, last_saved=start,
                     **grp_kwargs))
    n_params = sum(x.size for x in jax.tree.leaves(setup.abstract.params))
    logging.info("group %d: %d devices, %d params, examples %s", g,
                 len(devices[g]), n_params,
                 datasets.info.get("num_examples", ""))

  # The run's identity, once set-up found no bad data or checkpoint (a
  # failed resume must not rewrite the config of the run it failed on).
  if jax.process_index() == 0:
    ckpt_lib.write_config(workdir, config)

  # --------------------------------------------------------------------------
  # Evaluation: each group, then (when this job holds several) their ensemble
  # and how much they disagree.
  # --------------------------------------------------------------------------
  def evaluate(split: str) -> dict[int | str, dict[str, float]]:
    out = {}
    for grp in run:
      acc = metrics_lib.EvalAccumulator(config.loss)
      for batch in grp.datasets.evals[split]():
        acc.add(grp.eval_step(grp.state.params,
                              mesh_lib.shard_batch(batch, grp.batch_sharding)))
      out[grp.index] = {f"{split}/{k}": v for k, v in acc.summary().items()}
    if len(run) > 1:
      acc = metrics_lib.ComparisonAccumulator(config.loss)
      iters = [grp.datasets.evals[split]() for grp in run]
      for batches in zip(*iters):  # Same split, same order in every group.
        acc.add([grp.predict_step(grp.state.params, mesh_lib.shard_batch(
            b, grp.batch_sharding)) for grp, b in zip(run, batches)])
      out["groups"] = {f"{split}/{k}": v for k, v in acc.summary().items()}
    return out

  ensemble_writer = metrics_lib.MetricWriter(
      f"{workdir}/ensemble", enabled=len(run) > 1 and jax.process_index() == 0)

  # --------------------------------------------------------------------------
  # The loop. Metrics stay on device until a log step.
  # --------------------------------------------------------------------------
  total = config.total_steps
  steps = {grp.index: int(grp.state.step) for grp in run}
  for grp in run:
    grp.batches = iter(grp.datasets.train(steps[grp.index]))
    if grp.service is not None:  # Each batch arrives with its targets.
      grp.batches = grp.service.reader(grp.batches)
  first = min(steps.values())
  multi_process = jax.process_count() > 1
  t0, s0, wall0 = time.time(), first, time.time()
  final: dict = {}

  with _Preemption() as preemption:
    for step in range(first, total):
      for grp in run:
        if steps[grp.index] > step:
          continue  # This group resumed from a later checkpoint.
        batch = mesh_lib.shard_batch(next(grp.batches), grp.batch_sharding)
        distils = grp.reader is not None or grp.fixed_teachers is not None
        args = (grp.teachers(),) if distils else ()
        grp.state, m = grp.train_step(grp.state, batch, *args)
        grp.pending.append(m)
        if len(grp.pending) > MAX_STEPS_AHEAD:
          # Bound async dispatch: otherwise the host queues hundreds of steps
          # and anything else sent to the devices (eval, the exchange's copy
          # and restores) waits behind all of them.
          jax.block_until_ready(grp.pending[-MAX_STEPS_AHEAD - 1]["loss"])
        steps[grp.index] = step + 1
      done = step + 1

      # Exchange: publish own params (async), reload peers (background).
      if use_peers and is_time(done, cd.exchange_every):
        for grp in run:  # Publish all first: a reader may then see them.
          t = time.perf_counter()
          if multi_process:  # Orbax finalizers of two managers must not
            grp.checkpointer.wait()  # interleave their cross-process barriers.
          # Never stall on a slow save mid-run; the final params always go.
          grp.publisher.publish(done, grp.state.params, if_idle=(
              done != total and not cd.exchange_blocking))
          if cd.exchange_blocking:
            grp.publisher.wait()
          grp.exchange_blocked_s += time.perf_counter() - t
        for grp in run:
          t = time.perf_counter()
          grp.reader.refresh(block=cd.exchange_blocking)
          grp.exchange_blocked_s += time.perf_counter() - t

      # Halfway between exchanges, look again for peers' saves that had not
      # committed yet when this group refreshed (bounds staleness ~1.5x).
      half = cd.exchange_every // 2
      if (use_peers and not cd.exchange_blocking and half and
          is_time(done + half, cd.exchange_every)):
        for grp in run:
          t = time.perf_counter()
          grp.reader.start_refresh()
          grp.exchange_blocked_s += time.perf_counter() - t

      if is_time(done, config.log_every, total):
        # Rate over the last log window (the first one includes compilation).
        now = time.time()
        rate = (done - s0) / max(now - t0, 1e-9)
        t0, s0 = now, done
        losses_str = []
        for grp in run:
          scalars = {k: float(np.mean(v)) for k, v in jax.device_get(
              jax.tree.map(lambda *x: jnp.stack(x), *grp.pending)).items()}
          grp.pending.clear()
          _check_finite(done, scalars, grp.last_saved, grp.index)
          scalars["steps_per_sec"] = rate
          if grp.reader is not None:
            scalars.update(grp.reader.staleness(done))
            scalars["exchange_blocked_share"] = grp.exchange_blocked_s / max(
                now - wall0, 1e-9)
            scalars["publishes_skipped"] = grp.publisher.skipped
          if grp.service is not None:
            scalars.update(grp.batches.metrics())
          grp.writer.write(done, scalars)
          losses_str.append(f"{scalars['loss']:.4f}")
        eta = (total - done) / max(rate, 1e-9)
        logging.info("step %d/%d loss %s  %.2f steps/s  ETA %s", done, total,
                     " ".join(losses_str), rate,
                     time.strftime("%H:%M:%S", time.gmtime(eta)))

      if is_time(done, config.eval_every, total):
        splits = ["validation"] + (["test"] if done == total else [])
        final = {}
        for split in splits:
          for key, values in evaluate(split).items():
            final.setdefault(key, {}).update(values)
        for key, values in final.items():
          writer = (ensemble_writer if key == "groups" else
                    next(grp.writer for grp in run if grp.index == key))
          writer.write(done, values)
          logging.info("eval step %d %s: %s", done,
                       key if key == "groups" else f"group {key}", values)

      stop = preemption.should_stop(done)
      if is_time(done, config.checkpoint_every, total) or stop:
        for grp in run:
          # Never commit a non-finite state: param_norm is of the new params.
          if grp.pending:
            newest = jax.device_get(grp.pending[-1])
            _check_finite(done, {k: float(v) for k, v in newest.items()},
                          grp.last_saved, grp.index)
          if multi_process and grp.publisher is not None:
            grp.publisher.wait()
          grp.checkpointer.save(done, grp.state)
          grp.last_saved = done
      if stop:
        logging.warning("stopped at step %d after SIGTERM; resume with the "
                        "same command", done)
        break

  for grp in run:
    grp.checkpointer.wait()
    if grp.publisher is not None:
      grp.publisher.wait()
      grp.publisher.close()
      grp.reader.close()
    grp.checkpointer.close()
    grp.writer.close()
    if grp.service is not None:
      grp.batches.close()
  if teachers_service is not None:
    teachers_service.close()
  ensemble_writer.close()
  return final

"""The host loop: `train_and_evaluate(config, workdir)`, top to bottom.

One process drives the groups whose devices it owns (all of them in a plain
single-process run). Per group: its data shard, its state created sharded on
its own sub-mesh, its own checkpoints and logs under `workdir/group_<g>/`.
Dispatch is asynchronous, so groups on disjoint devices run concurrently.
"""

import dataclasses
import functools
import signal
import threading
import time
from typing import Any, Callable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codistill_jax import checkpoint as ckpt_lib
from codistill_jax import config_lib
from codistill_jax import data as data_lib
from codistill_jax import losses
from codistill_jax import mesh as mesh_lib
from codistill_jax import metrics as metrics_lib
from codistill_jax import models as models_lib
from codistill_jax import optim
from codistill_jax import step as step_lib


def is_time(step: int, every: int, total: int | None = None) -> bool:
  """The one 'is it time to X' rule: every `every` steps, and at the end."""
  return (every > 0 and step > 0 and step % every == 0) or step == total


@dataclasses.dataclass
class Group:
  """Everything the loop holds for one group this process drives."""
  index: int
  mesh: Any
  datasets: Any
  state: Any
  train_step: Callable
  eval_step: Callable
  batch_sharding: Any
  checkpointer: ckpt_lib.Checkpointer
  writer: metrics_lib.MetricWriter
  batches: Iterator | None = None
  pending: list = dataclasses.field(default_factory=list)  # device metrics.
  last_saved: int | None = None


class _Preemption:
  """SIGTERM -> a flag the loop checks each step: save, then exit cleanly."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint and exiting.")
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _owned_groups(config, group_devices) -> list[int]:
  """Groups with a device of this process (a process never splits a group's
  host-side work with another group)."""
  me = jax.process_index()
  return [g for g, devs in enumerate(group_devices)
          if any(d.process_index == me for d in devs)]


def _process_slot(devices) -> tuple[int, int]:
  """(index, count) of this process among the processes of a group."""
  procs = sorted({d.process_index for d in devices})
  return procs.index(jax.process_index()), len(procs)


def _example_inputs(batch):
  """One-example zeros with the batch's per-example shapes (for init)."""
  return jax.tree.map(lambda x: np.zeros((1,) + x.shape[1:], x.dtype),
                      batch["inputs"])


def _check_finite(step: int, scalars: dict, last_saved: int | None, g: int):
  bad = {k: v for k, v in scalars.items() if not np.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f"group {g}: {bad} at step {step}; the last good checkpoint is step "
        f"{last_saved}. Lower config.optimizer.learning_rate or set "
        "config.optimizer.grad_clip_norm")


@dataclasses.dataclass(frozen=True)
class Setup:
  """A group's model, optimizer and abstract state, sharded on its mesh."""
  model: Any
  tx: Any
  lr_fn: Callable
  init_fn: Callable  # rng -> TrainState; jit it with out_shardings.
  abstract: Any  # TrainState of ShapeDtypeStructs carrying the shardings.
  state_sharding: Any


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
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, state_sharding)
  return Setup(model, tx, lr_fn, init_fn, abstract, state_sharding)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains `config.num_groups` groups; returns the final eval metrics."""
  # --------------------------------------------------------------------------
  # Validate everything before compiling or writing anything.
  # --------------------------------------------------------------------------
  config_lib.validate(config)
  ckpt_lib.check_workdir(workdir, config)
  data_module = data_lib.get_module(config.data.name)
  group_devices = mesh_lib.group_devices(config.num_groups)
  owned = _owned_groups(config, group_devices)
  if jax.process_index() == 0:
    ckpt_lib.write_config(workdir, config)

  task_loss = losses.task_loss(config.loss)
  loss_fn = step_lib.make_loss_fn(task_loss)
  metrics_fn = metrics_lib.eval_metrics_fn(config.loss)

  # --------------------------------------------------------------------------
  # Per group: data shard, model, state created sharded on the sub-mesh.
  # --------------------------------------------------------------------------
  groups: list[Group] = []
  for g in owned:
    devices = group_devices[g]
    mesh = mesh_lib.make_mesh(devices)
    proc, nproc = _process_slot(devices)
    datasets = data_module.get_datasets(
        config, group=g, num_groups=config.num_groups, process_index=proc,
        process_count=nproc)
    setup = build(config, datasets, mesh)
    model, tx, lr_fn = setup.model, setup.tx, setup.lr_fn
    init_fn, abstract = setup.init_fn, setup.abstract
    state_sharding = setup.state_sharding
    # Every group starts from its own seed; retrains differ in config.seed.
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), g)
    data_sharding = mesh_lib.batch_sharding(mesh)
    repl = mesh_lib.replicated(mesh)

    # Resume order: own checkpoint, then config.init_checkpoint, then scratch.
    checkpointer = ckpt_lib.Checkpointer(
        f"{workdir}/group_{g}/checkpoints", config.keep_checkpoints)
    start = checkpointer.latest_step()
    if start is not None:
      state = checkpointer.restore(start, abstract)
      logging.info("group %d: resumed from its own checkpoint at step %d",
                   g, start)
    else:
      state = jax.jit(init_fn, out_shardings=state_sharding)(rng)
      if config.init_checkpoint:
        params = ckpt_lib.restore_params(config.init_checkpoint,
                                         abstract.params)
        state = state.replace(params=params)
        logging.info("group %d: params from %s", g, config.init_checkpoint)

    train_step = jax.jit(
        step_lib.make_train_step(model.apply, loss_fn, tx, lr_fn),
        in_shardings=(state_sharding, data_sharding),
        out_shardings=(state_sharding, repl), donate_argnums=(0,))
    eval_step = jax.jit(step_lib.make_eval_step(model.apply, metrics_fn),
                        in_shardings=(state_sharding.params, data_sharding))
    writer = metrics_lib.MetricWriter(f"{workdir}/group_{g}",
                                      enabled=proc == 0)
    groups.append(Group(g, mesh, datasets, state, train_step, eval_step,
                        data_sharding, checkpointer, writer,
                        last_saved=start))
    n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    logging.info("group %d: %d devices, %d params, %s", g, len(devices),
                 n_params, datasets.info.get("num_examples", ""))

  # --------------------------------------------------------------------------
  # Evaluation.
  # --------------------------------------------------------------------------
  def evaluate(grp: Group, splits) -> dict[str, float]:
    out = {}
    for split in splits:
      acc = metrics_lib.EvalAccumulator(config.loss)
      for batch in grp.datasets.evals[split]():
        sharded = mesh_lib.shard_batch(batch, grp.batch_sharding)
        acc.add(grp.eval_step(grp.state.params, sharded), batch)
      out.update({f"{split}/{k}": v for k, v in acc.summary().items()})
    return out

  # --------------------------------------------------------------------------
  # The loop. Metrics stay on device until a log step.
  # --------------------------------------------------------------------------
  total = config.total_steps
  steps = {grp.index: int(grp.state.step) for grp in groups}
  for grp in groups:
    grp.batches = iter(grp.datasets.train(steps[grp.index]))
  first = min(steps.values())
  t0, s0 = time.time(), first
  final_metrics = {}

  with _Preemption() as preemption:
    for step in range(first, total):
      for grp in groups:
        if steps[grp.index] > step:
          continue  # This group resumed from a later checkpoint.
        batch = mesh_lib.shard_batch(next(grp.batches), grp.batch_sharding)
        grp.state, m = grp.train_step(grp.state, batch)
        grp.pending.append(m)
        steps[grp.index] = step + 1
      done = step + 1

      if is_time(done, config.log_every, total):
        elapsed = time.time() - t0
        rate = (done - s0) / max(elapsed, 1e-9)
        loss_str = []
        for grp in groups:
          scalars = {k: float(np.mean(v)) for k, v in jax.device_get(
              jax.tree.map(lambda *x: jnp.stack(x), *grp.pending)).items()}
          grp.pending.clear()
          _check_finite(done, scalars, grp.last_saved, grp.index)
          scalars["steps_per_sec"] = rate
          grp.writer.write(done, scalars)
          loss_str.append(f"{scalars['loss']:.4f}")
        eta = (total - done) / max(rate, 1e-9)
        logging.info("step %d/%d loss %s  %.2f steps/s  ETA %s", done, total,
                     " ".join(loss_str), rate,
                     time.strftime("%H:%M:%S", time.gmtime(eta)))

      if is_time(done, config.eval_every, total):
        for grp in groups:
          final_metrics[grp.index] = evaluate(
              grp, ["validation"] + (["test"] if done == total else []))
          grp.writer.write(done, final_metrics[grp.index])
          logging.info("group %d step %d eval %s", grp.index, done,
                       final_metrics[grp.index])

      stop = preemption.requested
      if is_time(done, config.checkpoint_every, total) or stop:
        for grp in groups:
          # Never commit a non-finite state: param_norm is of the new params.
          if grp.pending:
            newest = jax.device_get(grp.pending[-1])
            _check_finite(done, {k: float(v) for k, v in newest.items()},
                          grp.last_saved, grp.index)
          grp.checkpointer.save(done, grp.state)
          grp.last_saved = done
      if stop:
        logging.warning("stopped at step %d after SIGTERM; resume with the "
                        "same command", done)
        break

  for grp in groups:
    grp.checkpointer.wait()
    grp.checkpointer.close()
    grp.writer.close()
  return final_metrics

"""The host loop: `train_and_evaluate(config, workdir)`, top to bottom.

G groups train at once. This job drives the groups whose devices it owns: all
of them in a plain single-process run or a multi-host job (every group then
spans all processes: `mesh.group_devices`), or the ones named by `groups` when
each group (or a few) runs as its own job. Per group: its disjoint data shard,
its state created sharded on its own sub-mesh, its teacher source, its own
checkpoints and logs under `workdir/group_<g>/` (`paths.py`). Dispatch is
asynchronous, so groups on disjoint devices run concurrently.

Where teachers come from is the group's source (`teachers.py`): with
`teacher_source='peers'` the groups meet only through files, every
`codistill.exchange_every` steps each publishes its params and reloads its
peers' newest committed ones, and its train step distils towards the mean of
their predictions. One group, or alpha = 0, is the synchronous data-parallel
baseline: the same loop and step. What the job writes, and in which order, is
the storage owner's (`storage.py`).
"""

import dataclasses
import functools
import time
from typing import Any, Callable, Iterator

from absl import logging
import jax
import ml_collections

import codistill_jax
from codistill_jax import build
from codistill_jax import cadence
from codistill_jax import checkpoint as ckpt_lib
from codistill_jax import config_lib
from codistill_jax import data as data_lib
from codistill_jax import evaluation
from codistill_jax import mesh as mesh_lib
from codistill_jax import metrics as metrics_lib
from codistill_jax import noise_scale
from codistill_jax import paths
from codistill_jax import perf
from codistill_jax import storage as storage_lib
from codistill_jax import teachers as teachers_lib
from codistill_jax import validate
from codistill_jax.data import pipeline
from codistill_jax.errors import ConfigError

# How many steps the host may dispatch ahead of the devices.
MAX_STEPS_AHEAD = 2


@dataclasses.dataclass
class Group:
  """Everything the loop holds for one group this job drives."""
  index: int
  config: Any  # The group's own config (`config_lib.group_config`).
  datasets: Any
  state: Any
  source: teachers_lib.Source
  train_step: Callable
  eval_step: Callable
  predict_step: Callable
  batch_sharding: Any
  setup: Any = None  # Its `build.Setup` (the step is rebuilt from it).
  task_from: int = 0  # Its step's `task_from` (a joiner's warm-up).
  writer: metrics_lib.MetricWriter | None = None
  batches: Iterator | None = None
  speed: perf.Speed = perf.Speed()  # What its steps/s means.
  pending: list = dataclasses.field(default_factory=list)  # Device metrics.
  noise_scale: Callable | None = None  # (state, batch) -> noise metrics.
  noise: list = dataclasses.field(default_factory=list)  # Its pending ones.


def _process_slot(procs: list[int]) -> tuple[int, int]:
  """(index, count) of this process among the processes of a group."""
  return procs.index(jax.process_index()), len(procs)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       groups: list[int] | None = None,
                       profile_steps: tuple[int, int] | None = None) -> dict:
  """Trains this job's groups (default: all G); returns final eval metrics.

  Args:
    config: the experiment config (validated here again).
    workdir: checkpoints, logs and, by default, the exchange directory.
    groups: the groups this job runs; the others are peers met only through
      the exchange directory (separate processes or jobs).
    profile_steps: (a, b): a `jax.profiler` trace of steps a..b-1 into
      WORKDIR/profile (TensorBoard's profile plugin opens it).
  """
  # --------------------------------------------------------------------------
  # Validate everything before compiling or writing anything.
  # --------------------------------------------------------------------------
  num_groups = config.codistill.num_groups
  top = config_lib.max_groups(config)
  groups = list(range(num_groups)) if groups is None else sorted(set(groups))
  if not groups or not all(0 <= g < top for g in groups):
    raise ConfigError(f"--groups={groups} must name groups in "
                      f"0..{top - 1} (config.codistill.num_groups"
                      f"{', max_groups' if top > num_groups else ''})")
  validate.validate(config, groups=groups)
  if profile_steps and profile_steps[1] > config.total_steps:
    raise ConfigError(f"--profile_steps={profile_steps[0]}:{profile_steps[1]}"
                      f" ends after config.total_steps={config.total_steps}:"
                      " pick steps inside the run")
  ckpt_lib.check_workdir(workdir, config)
  data_module = data_lib.get_module(config.data.name)
  devices = dict(zip(groups, mesh_lib.group_devices(
      len(groups), sizes=mesh_lib.group_sizes(config, groups,
                                              jax.device_count()))))
  procs_of = {g: sorted({d.process_index for d in devices[g]}) for g in groups}
  owned = [g for g in groups if jax.process_index() in procs_of[g]]
  total = config.total_steps
  storage = storage_lib.Storage(
      workdir, paths.exchange_dir(config, workdir), owned,
      config.keep_checkpoints, run=ckpt_lib.run_identity(config),
      primary=jax.process_index() == 0)
  storage.check_writers()
  joiners = [g for g in groups if g >= num_groups]
  if joiners:
    storage.check_joinable(joiners)
  sources = teachers_lib.Sources(config, storage, total)

  # --------------------------------------------------------------------------
  # Per group: data shard, model, state created sharded on its sub-mesh (or
  # resumed), teacher source and the compiled steps. Reads only: bad data, a
  # checkpoint of another model or a missing teacher stops here, before the
  # first write.
  # --------------------------------------------------------------------------
  run: list[Group] = []
  outputs = {}  # Each group's logits shape: one output space for all.
  flops_of = {}  # A step's FLOPs, per kind of group.
  for g in owned:
    gconf = config_lib.group_config(config, g)  # Its model, batch, ...
    mesh = mesh_lib.make_mesh(devices[g], gconf.sharding.model_axis)
    proc, nproc = _process_slot(procs_of[g])
    # A group that joins later reads the shard of group g mod num_groups.
    datasets = data_module.get_datasets(
        gconf, group=g % num_groups, num_groups=num_groups,
        process_index=proc, process_count=nproc)
    setup = build.build(gconf, datasets, mesh)
    outputs[g] = jax.eval_shape(
        lambda p, x, m=setup.model: m.apply(p, x, train=False),
        setup.abstract.params, setup.example).shape
    teachers_lib.check_output_spaces(config, outputs)

    # Resume order: own checkpoint, then config.init_checkpoint, then scratch.
    start, state = storage.resume(g, setup.abstract)
    if start is not None:
      logging.info("group %d: resumed from its own checkpoint at step %d",
                   g, start)
    else:
      # Every group starts from its own seed (parameter averaging: its
      # params from group 0's); retrains differ in config.seed.
      seed = jax.random.PRNGKey(config.seed)
      init = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)
      state = init(jax.random.fold_in(seed, g))
      if sources.shared_init and g:
        state = state.replace(params=init(jax.random.fold_in(seed, 0)).params)
      if config.init_checkpoint:
        state = state.replace(params=ckpt_lib.restore_params(
            config.init_checkpoint, setup.abstract.params))
        logging.info("group %d: params from %s", g, config.init_checkpoint)
      elif g >= num_groups:  # Joins a running run: a fresh group.
        params = teachers_lib.join_params(config, g, setup, storage)
        if params is not None:
          state = state.replace(params=params)

    example = next(iter(datasets.train(0)))
    source = sources.make(g, setup, datasets, state.params)
    # (A source that met peers which joined the run has their layout.)
    layout = source.relayout() or sources.layout(setup, example, g)
    # A group that joins a running run may first learn from its peers alone.
    task_from = gconf.codistill.join_warmup_steps if g >= num_groups else 0
    train_step = build.train_step(gconf, setup, layout, task_from)
    # Each group's own count (groups may differ in model, batch, devices),
    # counted once for groups alike: the model's own where it has one
    # (teachers of its architecture), else XLA's (a lowering of the step).
    unit, per_step = perf.describe(example)
    alike = (id(gconf), layout.num_teachers, len(devices[g]))
    if alike not in flops_of:
      flops = 0 if layout.mixed else nproc * perf.model_flops(
          setup.model, example, layout.num_teachers)
      flops_of[alike] = flops or perf.step_flops(
          train_step, setup.abstract, {
              **build.with_shardings(example,
                                     mesh_lib.batch_sharding(mesh)),
              **layout.batch}, *layout.args)
    speed = perf.Speed(unit, per_step * nproc, flops_of[alike],
                       len(devices[g]), perf.peak_flops(devices[g][0]))
    run.append(Group(
        g, gconf, datasets, state, source, train_step,
        build.jit_eval_step(gconf, setup),
        build.jit_eval_step(gconf, setup, predictions=True),
        mesh_lib.batch_sharding(mesh), setup=setup, task_from=task_from,
        speed=speed,
        noise_scale=(build.jit_noise_scale(gconf, setup)
                     if gconf.noise_scale.every else None)))
    n_params = sum(x.size for x in jax.tree.leaves(setup.abstract.params))
    logging.info("group %d: %d devices, %d params, examples %s", g,
                 len(devices[g]), n_params,
                 datasets.info.get("num_examples", ""))

  # --------------------------------------------------------------------------
  # The first writes: managers, the run's identity, metric writers.
  # --------------------------------------------------------------------------
  storage.open(publishing=owned if sources.publishes else [], config=config,
               members={grp.index: {
                   "model_name": grp.config.model_name,
                   "model": grp.config.model.to_dict(),
                   "devices": len(devices[grp.index]),
                   "batch_size": grp.config.data.batch_size} for grp in run})
  status, steps_done = "failed", {}
  try:
    final = _loop(config, workdir, run, storage, procs_of, profile_steps,
                  steps_done)
    status = "left"
  finally:
    for grp in run:  # Input threads end before anything else (see Prefetch).
      if grp.batches is not None:
        grp.batches.close()
    storage.leave(max(steps_done.values(), default=0), status)
    storage.release()  # The locks go even when the loop fails.
  storage.close()
  sources.close()
  return final


def _loop(config, workdir: str, run: list[Group], storage, procs_of,
          profile_steps, steps: dict) -> dict:
  """Trains `run`'s groups to config.total_steps (or a stop); returns evals."""
  total = config.total_steps
  if jax.process_index() == 0:
    ckpt_lib.write_config(workdir, config)
  for grp in run:
    proc, _ = _process_slot(procs_of[grp.index])
    grp.writer = metrics_lib.MetricWriter(paths.group_dir(workdir, grp.index),
                                          enabled=proc == 0)
  ensemble_writer = metrics_lib.MetricWriter(
      paths.ensemble_dir(workdir),
      enabled=len(run) > 1 and jax.process_index() == 0)

  evaluate = functools.partial(evaluation.evaluate, config, run)

  # --------------------------------------------------------------------------
  # The loop. Metrics stay on device until a log step.
  # --------------------------------------------------------------------------
  # Each group's steps done (also read by the caller when the loop fails).
  steps.update({grp.index: int(grp.state.step) for grp in run})
  depth = pipeline.prefetch_depth(config.data.prefetch, [
      d for grp in run for d in grp.batch_sharding.mesh.local_devices])
  for grp in run:
    # The next batches are made and put on the group's devices on a thread
    # while the current step runs.
    grp.batches = pipeline.Prefetch(
        grp.source.wrap(iter(grp.datasets.train(steps[grp.index]))),
        functools.partial(mesh_lib.shard_batch, sharding=grp.batch_sharding),
        depth=depth)
  first = min(steps.values())
  t0, s0 = time.time(), first
  # Goodput: the share of the log window's wall time not spent evaluating,
  # saving or in the group's exchange (publishing, restoring, waiting).
  idle = {"eval": 0.0, "save": 0.0}
  exchange_s = {grp.index: 0.0 for grp in run}
  final: dict = {}

  profile = perf.Trace(profile_steps, paths.profile_dir(workdir))
  with storage_lib.Preemption() as preemption, profile, perf.prompt_threads():
    for step in range(first, total):
      profile.at(step)
      for grp in run:
        if steps[grp.index] > step:
          continue  # This group resumed from a later checkpoint.
        batch = next(grp.batches)
        if grp.noise_scale and cadence.is_time(step + 1,
                                               grp.config.noise_scale.every):
          grp.noise.append(grp.noise_scale(grp.state, batch))
        grp.state, m = grp.train_step(grp.state, batch,
                                      *grp.source.step_args(step))
        if step == first and grp is run[0]:
          jax.block_until_ready(m)
          logging.info("first step done %.1f s after start-up began",
                       time.time() - codistill_jax.START_TIME)
        grp.pending.append(m)
        if len(grp.pending) > MAX_STEPS_AHEAD:
          # Bound async dispatch: otherwise the host queues hundreds of steps
          # and anything else sent to the devices (eval, the exchange's copy
          # and restores) waits behind all of them.
          jax.block_until_ready(grp.pending[-MAX_STEPS_AHEAD - 1]["loss"])
        steps[grp.index] = step + 1
      done = step + 1

      # Every group shares before any refreshes: a reader may then see all.
      for grp in run:
        grp.source.share(done, grp.state.params)
      for grp in run:
        grp.source.refresh(done)
      for grp in run:
        grp.state = grp.source.update(done, grp.state)
        layout = grp.source.relayout()
        if layout is not None:  # A peer joined: its teachers join the step.
          logging.info("group %d: step rebuilt for %d teachers", grp.index,
                       layout.num_teachers)
          grp.train_step = build.train_step(grp.config, grp.setup, layout,
                                            grp.task_from)

      if cadence.is_time(done, config.log_every, total):
        # Rate over the last log window (the first one includes compilation).
        now = time.time()
        window = now - t0
        rate = (done - s0) / max(window, 1e-9)
        t0, s0 = now, done
        losses_str = []
        for grp in run:
          blocked = getattr(grp.source, "blocked_s", 0.0)
          grp_exchange, exchange_s[grp.index] = (
              blocked - exchange_s[grp.index], blocked)
          goodput = max(0.0, 1.0 - (idle["eval"] + idle["save"] +
                                    grp_exchange) / max(window, 1e-9))
          stacked = jax.device_get(metrics_lib.stack_window(grp.pending))
          grp.pending.clear()
          metrics_lib.check_finite(config, done, stacked, storage.last_saved[grp.index],
                        grp.index)
          scalars = metrics_lib.window_means(stacked)
          if grp.noise:
            noise = metrics_lib.window_means(
                jax.device_get(metrics_lib.stack_window(grp.noise)))
            grp.noise.clear()
            scalars.update(noise)
            scalars.update(noise_scale.summarize(
                noise, grp.config.data.batch_size))
          scalars.update(grp.speed.scalars(rate))
          scalars["goodput"] = goodput
          scalars.update(grp.source.metrics(done))
          grp.writer.write(done, scalars)
          losses_str.append(f"{scalars['loss']:.4f}")
        idle.update(eval=0.0, save=0.0)
        eta = (total - done) / max(rate, 1e-9)
        logging.info("step %d/%d loss %s  %.2f steps/s  %s  ETA %s", done,
                     total, " ".join(losses_str), rate,
                     run[0].speed.describe(rate),
                     time.strftime("%H:%M:%S", time.gmtime(eta)))

      if cadence.is_time(done, config.eval_every, total):
        t_eval = time.time()
        periodic = run[0].datasets.periodic_split
        splits = (list(run[0].datasets.evals) if done == total
                  else [periodic])
        final = {}
        for split in splits:
          for key, values in evaluate(split).items():
            final.setdefault(key, {}).update(values)
        for grp in run:
          grp.source.evaluated(done, {
              k: v for k, v in final.get(grp.index, {}).items()
              if k.startswith(f"{periodic}/")})
        for key, values in final.items():
          writer = (ensemble_writer if key == "groups" else
                    next(grp.writer for grp in run if grp.index == key))
          writer.write(done, values)
          logging.info("eval step %d %s: %s", done,
                       key if key == "groups" else f"group {key}", values)
        idle["eval"] += time.time() - t_eval

      stop = preemption.should_stop(done)
      if cadence.is_time(done, config.checkpoint_every, total) or stop:
        for grp in run:
          # Never commit a non-finite state: param_norm is of the new params.
          if grp.pending:
            newest = jax.device_get(grp.pending[-1])
            metrics_lib.check_finite(config, done, newest, storage.last_saved[grp.index],
                          grp.index)
        t_save = time.time()
        storage.save(done, {grp.index: grp.state for grp in run})
        idle["save"] += time.time() - t_save
      if stop:
        logging.warning("stopped at step %d after SIGTERM or Ctrl-C; resume "
                        "with the same command", done)
        break

  for grp in run:
    grp.writer.close()
  ensemble_writer.close()
  return final

r"""The trainer against a plain JAX loop on the same jitted step.

For 1 group and for 2 groups in one process (2 CPU devices, one sub-mesh
each; the 2-group step distils from zero-weight teachers and the exchange is
off, so only the loop differs), alternately for `--rounds`:

  trainer  `python -m codistill_jax.main` (metrics, logging, prefetch, the
           preemption check, checkpoints at the end): the median of its
           logged steps/s over the log windows after the first two;
  plain    the loop a user writes around the same `build.train_step`:
           batch = shard(next(it)); state, m = step(state, batch, *teachers),
           timed over the same steps after the same warm-up, in its own
           process.

  python experiments/bench_loop.py [--config=experiments/bench_models/fashion_mlp.py] \
      [--steps=1500] [--rounds=3] [--trainer_overrides=data.prefetch=0] \
      [--out=experiments/results/bench_loop.json]

Prints the trainer / plain ratio per round and its median, and writes them.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

_CONFIG = flags.DEFINE_string("config",
                              "experiments/bench_models/fashion_mlp.py",
                              "Config file (at the repository root).")
_STEPS = flags.DEFINE_integer("steps", 1500, "Steps per run.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Trainer/plain pairs.")
_GROUPS = flags.DEFINE_list("groups", ["1", "2"], "Group counts.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        "bench_loop.json"), "Where the numbers go.")
_EXTRA = flags.DEFINE_list(
    "trainer_overrides", [], "More config overrides of the trainer's runs "
    "(a.b=v), e.g. data.prefetch=0 to make batches in the loop's thread.")
_PLAIN = flags.DEFINE_integer("plain_child", 0, "Internal: run the plain "
                              "loop for this many groups and print steps/s.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_EVERY = 50
WARMUP = 2 * LOG_EVERY  # Steps before timing (the trainer's first windows).


def _env(groups: int) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={groups}",
          "PYTHONPATH": os.pathsep.join([ROOT,
                                         os.path.join(ROOT, "experiments")])}


def _overrides(groups: int, steps: int) -> list[str]:
  return [f"codistill.num_groups={groups}", f"total_steps={steps}",
          f"log_every={LOG_EVERY}", f"eval_every={steps}",
          f"checkpoint_every={steps}", "eval_max_batches=1",
          "codistill.exchange_every=100000", "codistill.burn_in_steps=0"]


def trainer_rate(groups: int, steps: int) -> float:
  with tempfile.TemporaryDirectory() as workdir:
    subprocess.run(
        [sys.executable, "-m", "codistill_jax.main", f"--config={_CONFIG.value}",
         f"--workdir={workdir}",
         *[f"--config.{o}" for o in _overrides(groups, steps) + _EXTRA.value]],
        cwd=ROOT, env=_env(groups), check=True, capture_output=True)
    rows = [json.loads(l) for l in open(os.path.join(
        workdir, "group_0", "metrics.jsonl")) if '"steps_per_sec"' in l]
  return float(np.median([r["steps_per_sec"] for r in rows[2:]]))


def plain_rate(groups: int, steps: int) -> float:
  out = subprocess.run(
      [sys.executable, os.path.abspath(__file__), f"--config={_CONFIG.value}",
       f"--steps={steps}", f"--plain_child={groups}"], cwd=ROOT,
      env=_env(groups), check=True, capture_output=True, text=True)
  return float(out.stdout.strip().splitlines()[-1])


def plain_loop(groups: int, steps: int) -> float:
  """The plain loop, in this process: steps/s after the warm-up."""
  sys.path.insert(0, ROOT)
  # pylint: disable=g-import-not-at-top
  import jax
  from codistill_jax import build
  from codistill_jax import config_lib
  from codistill_jax import data as data_lib
  from codistill_jax import mesh as mesh_lib
  from codistill_jax import teachers as teachers_lib
  # pylint: enable=g-import-not-at-top
  config = config_lib.load(os.path.join(ROOT, _CONFIG.value),
                           _overrides(groups, steps))
  module = data_lib.get_module(config.data.name)
  runs = []
  for g, devices in enumerate(mesh_lib.group_devices(groups)):
    mesh = mesh_lib.make_mesh(devices)
    datasets = module.get_datasets(config, group=g, num_groups=groups,
                                   process_index=0, process_count=1)
    setup = build.build(config, datasets, mesh)
    layout = teachers_lib.layout(config, setup,
                                 next(iter(datasets.train(0))))
    step = build.train_step(config, setup, layout)
    zeros = lambda tree: jax.tree.map(
        lambda a: jax.numpy.zeros(a.shape, a.dtype, device=a.sharding), tree)
    # Stacked teachers as arguments, or targets in the batch (a service or
    # a store would fill them in; zeros cost the step the same).
    args, extra = tuple(zeros(a) for a in layout.args), zeros(layout.batch)
    state = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(
        jax.random.PRNGKey(g))
    runs.append([step, state, iter(datasets.train(0)), args,
                 mesh_lib.batch_sharding(mesh), extra])
  t = None
  for i in range(steps):
    if i == WARMUP:
      jax.block_until_ready([r[1] for r in runs])
      t = time.perf_counter()
    for r in runs:
      batch = {**mesh_lib.shard_batch(next(r[2]), r[4]), **r[5]}
      r[1], _ = r[0](r[1], batch, *r[3])
  jax.block_until_ready([r[1] for r in runs])
  return (steps - WARMUP) / (time.perf_counter() - t)


def main(argv):
  del argv
  if _PLAIN.value:
    print(plain_loop(_PLAIN.value, _STEPS.value))
    return
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_lib  # pylint: disable=g-import-not-at-top
  results = {"config": _CONFIG.value, "steps": _STEPS.value,
             "trainer_overrides": _EXTRA.value, "runs": []}
  for groups in map(int, _GROUPS.value):
    ratios = []
    for r in range(_ROUNDS.value):
      trainer = trainer_rate(groups, _STEPS.value)
      plain = plain_rate(groups, _STEPS.value)
      ratios.append(trainer / plain)
      results["runs"].append({"groups": groups, "round": r,
                              "trainer_steps_per_s": trainer,
                              "plain_steps_per_s": plain})
      print(f"{groups} group(s) round {r}: trainer {trainer:.1f} steps/s, "
            f"plain loop {plain:.1f} -> {trainer / plain:.3f}x", flush=True)
    results[f"ratio_{groups}_groups"] = float(np.median(ratios))
    print(f"{groups} group(s): trainer / plain loop = "
          f"{np.median(ratios):.3f}x (median of {len(ratios)})", flush=True)
  bench_lib.write_json(_OUT.value, results)


if __name__ == "__main__":
  app.run(main)

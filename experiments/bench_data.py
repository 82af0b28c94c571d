r"""Would the input pipeline starve the step? Each data module alone vs a step.

For each workload: the examples/s its data module delivers on one host (the
trainer's path: `Datasets.train(step)` batches, put on the devices by the
same prefetch thread), against the examples/s its own train step consumes
on this machine (the step jitted and run alone on one CPU device). A ratio
of 10 or more means the data keeps up with a step 10x faster than this CPU's.

  python experiments/bench_data.py [--workloads=flights,fashion_mnist,kernel_lm] \
      [--batches=300] [--out=experiments/results/bench_data.json]

Needs the Debian datasets of DATA.md for fashion_mnist and kernel_lm.
"""

import os
import sys
import time

from absl import app
from absl import flags

_WORKLOADS = flags.DEFINE_list("workloads",
                               ["flights", "fashion_mnist", "kernel_lm"],
                               "Config names under configs/.")
_BATCHES = flags.DEFINE_integer("batches", 300, "Batches timed per pipeline.")
_STEPS = flags.DEFINE_integer("steps", 60, "Steps timed per step.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        "bench_data.json"), "Where the numbers go.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(name: str) -> dict:
  sys.path.insert(0, ROOT)
  # pylint: disable=g-import-not-at-top
  import functools
  import jax
  from codistill_jax import build
  from codistill_jax import config_lib
  from codistill_jax import data as data_lib
  from codistill_jax import mesh as mesh_lib
  from codistill_jax.data import pipeline
  # pylint: enable=g-import-not-at-top
  config = config_lib.load(config_lib.config_path(name), lock=False)
  datasets = data_lib.get_module(config.data.name).get_datasets(
      config, group=0, num_groups=1, process_index=0, process_count=1)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  sharding = mesh_lib.batch_sharding(mesh)
  batch_size = config.data.batch_size

  # The pipeline alone, as the trainer runs it (prefetch thread + transfer).
  feed = pipeline.Prefetch(iter(datasets.train(0)), functools.partial(
      mesh_lib.shard_batch, sharding=sharding))
  for _ in range(10):
    jax.block_until_ready(next(feed))
  t = time.perf_counter()
  for _ in range(_BATCHES.value):
    jax.block_until_ready(next(feed))
  data_rate = _BATCHES.value * batch_size / (time.perf_counter() - t)
  feed.close()

  # The step alone, on one device, fed the same batch over and over.
  setup = build.build(config, datasets, mesh)
  step = build.train_step(config, setup)
  state = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(
      jax.random.PRNGKey(0))
  batch = mesh_lib.shard_batch(next(iter(datasets.train(0))), sharding)
  for _ in range(5):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(_STEPS.value):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  step_rate = _STEPS.value * batch_size / (time.perf_counter() - t)
  return {"workload": name, "data_module": config.data.name,
          "batch_size": batch_size, "pipeline_examples_per_s": data_rate,
          "step_examples_per_s": step_rate, "ratio": data_rate / step_rate}


def main(argv):
  del argv
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_lib  # pylint: disable=g-import-not-at-top
  rows = []
  for name in _WORKLOADS.value:
    row = measure(name)
    rows.append(row)
    print(f"{name:<14} {row['data_module']:<14} pipeline "
          f"{row['pipeline_examples_per_s']:>10.0f} ex/s   step "
          f"{row['step_examples_per_s']:>9.0f} ex/s   ratio "
          f"{row['ratio']:6.1f}x", flush=True)
  bench_lib.write_json(_OUT.value, {"rows": rows,
                                    "cores": os.cpu_count()})


if __name__ == "__main__":
  app.run(main)

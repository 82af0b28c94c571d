r"""Step benchmark: compile time, step time, examples/s, forward/step ratio.

For each workload's quick and default config, on one group of all visible
devices (1 CPU device unless XLA_FLAGS says otherwise):

  python experiments/bench_step.py [--steps=30] \
      [--out=experiments/results/bench_step.json]

`forward/step` is the time of one deterministic forward pass over the batch
divided by the time of one train step; the codistillation overhead floor is
`step * (1 + (G - 1) * forward/step)` for G groups.
"""


from absl import app
from absl import flags
import jax
import time

import bench_lib  # Sibling module: run from the repo root or experiments/.
from codistill_jax import data as data_lib
from codistill_jax import mesh as mesh_lib
from codistill_jax import build
from codistill_jax import validate

_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per config.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_step.json",
                           "Where to write the numbers (JSON).")
_WORKLOADS = flags.DEFINE_list(
    "workloads", ["flights", "fashion_mnist", "kernel_lm"],
    "Config files under configs/ to benchmark.")


def bench(config) -> dict:
  validate.validate(config)
  mesh = mesh_lib.make_mesh(jax.devices())
  datasets = data_lib.get_module(config.data.name).get_datasets(
      config, group=0, num_groups=1, process_index=0, process_count=1)
  setup = build.build(config, datasets, mesh)
  sharding = mesh_lib.batch_sharding(mesh)
  batch = mesh_lib.shard_batch(next(iter(datasets.train(0))), sharding)
  state = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(
      jax.random.PRNGKey(0))
  step_fn = build.train_step(config, setup)  # The trainer's own step.
  t = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  forward = jax.jit(lambda p, x: setup.model.apply(p, x, train=False))

  holder = [state]

  def one_step():
    holder[0], m = compiled(holder[0], batch)
    return m["loss"]

  for _ in range(3):  # Warm-up.
    one_step()
    forward(holder[0].params, batch["inputs"]).block_until_ready()
  n = _STEPS.value
  step_s = bench_lib.median_time(one_step, n)
  fwd_s = bench_lib.median_time(lambda: forward(holder[0].params, batch["inputs"]), n)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  return {"params": int(n_params), "batch": config.data.batch_size,
          "compile_s": compile_s, "step_ms": 1e3 * step_s,
          "examples_per_s": config.data.batch_size / step_s,
          "forward_over_step": fwd_s / step_s}


def main(argv):
  del argv
  results = {"devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
             "rows": []}
  print(f"{'config':<24}{'params':>10}{'batch':>7}{'compile s':>11}"
        f"{'step ms':>10}{'ex/s':>10}{'fwd/step':>10}")
  for name in _WORKLOADS.value:
    for arg in ("quick", None):
      row = {"config": f"{name}:{arg or 'default'}",
             **bench(bench_lib.load_config(name, arg))}
      results["rows"].append(row)
      print(f"{row['config']:<24}{row['params']:>10}{row['batch']:>7}"
            f"{row['compile_s']:>11.2f}{row['step_ms']:>10.2f}"
            f"{row['examples_per_s']:>10.0f}{row['forward_over_step']:>10.3f}",
            flush=True)
  bench_lib.write_json(_OUT.value, results)


if __name__ == "__main__":
  app.run(main)

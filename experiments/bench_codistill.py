r"""Codistillation overhead: G-way step vs the baseline step, and exchange cost.

1. Step overhead. On one sub-mesh (all visible devices), the baseline train
   step and the G-way step (G - 1 stale peers run forward inside it), timed
   side by side. The floor is `baseline * (1 + (G - 1) * forward/step)` with
   forward/step measured in the same run; target: G-way <= 1.10 x floor.
2. Exchange cost. Real 2-group runs (one process, one device per group) at
   the configs' default `exchange_every`; the share of wall time the host loop
   spends blocked in publish/refresh/stacking (`exchange_blocked_share`);
   target <= 1%.

  python experiments/bench_codistill.py [--workloads=flights,fashion_mnist] \
      [--groups=2,3,4] [--exchange=flights:2000,fashion_mnist:300]

Writes experiments/results/bench_codistill.json.
"""

import os
import sys
import tempfile

from absl import app
from absl import flags

_WORKLOADS = flags.DEFINE_list("workloads", ["flights", "fashion_mnist",
                                             "kernel_lm"], "Config files.")
_GROUPS = flags.DEFINE_list("groups", ["2", "3", "4"], "Values of G.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per measurement.")
_EXCHANGE = flags.DEFINE_list(
    "exchange", ["flights:2000", "fashion_mnist:300"],
    "config:steps of the 2-group runs measuring exchange cost ('' skips).")
_DEVICES = flags.DEFINE_integer("devices_per_group", 1,
                                "Devices of the sub-mesh of part 1.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_codistill.json",
                           "Output JSON.")


def step_overhead(name: str, groups: list[int], steps: int) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import bench_lib  # pylint: disable=g-import-not-at-top
  from codistill_jax import build  # pylint: disable=g-import-not-at-top
  from codistill_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from codistill_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from codistill_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  from codistill_jax import teachers as teachers_lib  # pylint: disable=g-import-not-at-top

  config = bench_lib.load_config(name, None)
  mesh = mesh_lib.make_mesh(jax.devices()[:_DEVICES.value])
  datasets = data_lib.get_module(config.data.name).get_datasets(
      config, group=0, num_groups=1, process_index=0, process_count=1)
  setup = build.build(config, datasets, mesh)
  sharding = mesh_lib.batch_sharding(mesh)
  batch = mesh_lib.shard_batch(next(iter(datasets.train(0))), sharding)
  init = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)
  forward = jax.jit(lambda p, x: setup.model.apply(p, x, train=False))

  def timed(fn, *args):
    holder = [init(jax.random.PRNGKey(0))]

    def one():
      holder[0], m = fn(holder[0], *args)
      return m["loss"]

    for _ in range(3):
      one().block_until_ready()
    return bench_lib.median_time(one, steps)

  base = build.train_step(config, setup)  # The trainer's own steps.
  base_s = timed(base, batch)
  params = init(jax.random.PRNGKey(1)).params
  for _ in range(3):
    forward(params, batch["inputs"]).block_until_ready()
  fwd_s = bench_lib.median_time(lambda: forward(params, batch["inputs"]),
                                 steps)
  rows = []
  for g in groups:
    # G groups of peers, distilling from step 0.
    cg = config.copy_and_resolve_references()
    cd = cg.codistill
    cd.num_groups, cd.burn_in_steps, cd.alpha_ramp_steps = g, 0, 0
    layout = teachers_lib.layout(cg, setup, next(iter(datasets.train(0))))
    dtype = jnp.dtype(cd.teacher_dtype)
    teachers = jax.device_put(step_lib.Teachers(
        jax.tree.map(lambda x: jnp.stack([x.astype(dtype)] * (g - 1)),
                     params), jnp.ones((g - 1,), jnp.float32)),
                              layout.arg_shardings[0])
    step = build.train_step(cg, setup, layout)
    g_s = timed(lambda s, b, step=step, t=teachers: step(s, b, t), batch)
    floor = base_s * (1 + (g - 1) * fwd_s / base_s)
    rows.append({"config": name, "G": g, "baseline_ms": 1e3 * base_s,
                 "forward_over_step": fwd_s / base_s,
                 "g_way_ms": 1e3 * g_s, "floor_ms": 1e3 * floor,
                 "g_way_over_floor": g_s / floor})
    print(f"{name:<14} G={g}  baseline {1e3 * base_s:8.2f} ms  fwd/step "
          f"{fwd_s / base_s:5.3f}  G-way {1e3 * g_s:8.2f} ms  floor "
          f"{1e3 * floor:8.2f} ms  G-way/floor {g_s / floor:5.3f}", flush=True)
  return rows


def exchange_cost(name: str, steps: int) -> dict:
  """A real 2-group run; returns the blocked share it logged."""
  import bench_lib  # pylint: disable=g-import-not-at-top
  from codistill_jax import metrics  # pylint: disable=g-import-not-at-top
  from codistill_jax import train  # pylint: disable=g-import-not-at-top
  config = bench_lib.load_config(name, None)
  config.codistill.num_groups = 2
  config.total_steps, config.log_every = steps, steps
  config.eval_every = config.checkpoint_every = steps
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    out = {"config": f"{name}:groups=2", "steps": steps,
           "exchange_every": config.codistill.exchange_every}
    for g in (0, 1):
      last = [r for r in metrics.read_jsonl(
          os.path.join(workdir, f"group_{g}", "metrics.jsonl"))
              if "exchange_blocked_share" in r][-1]
      out[f"group_{g}_blocked_share"] = last["exchange_blocked_share"]
      out[f"group_{g}_staleness"] = last["staleness/group_{}".format(1 - g)]
  print(f"exchange {name}: blocked share {out['group_0_blocked_share']:.4f} / "
        f"{out['group_1_blocked_share']:.4f} of wall time over {steps} steps "
        f"(exchange_every={out['exchange_every']})", flush=True)
  return out


def main(argv):
  del argv
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if "xla_force_host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", ""):
    # On CPU, 2 devices: one per group for part 2 (ignored on accelerators).
    jax.config.update("jax_num_cpu_devices", 2)
  groups = [int(g) for g in _GROUPS.value]
  results = {"devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
             "step_overhead": []}
  for name in _WORKLOADS.value:
    results["step_overhead"] += step_overhead(name, groups, _STEPS.value)
  results["exchange"] = []
  for item in filter(None, _EXCHANGE.value):
    name, steps = item.split(":")
    results["exchange"].append(exchange_cost(name, int(steps)))
  bench_lib.write_json(_OUT.value, results)


if __name__ == "__main__":
  app.run(main)

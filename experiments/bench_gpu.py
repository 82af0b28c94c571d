r"""One accelerator: the LM's baseline step against its codistillation step.

For each size of `configs/lm.py` (by default 125m, 1b, 8b: the largest that
fits is the last row without an error) one group's train step runs on one
device twice, side by side in one process: the plain step, and the
codistillation step with G - 1 stacked peer teachers in
`config.codistill.teacher_dtype` (bf16 in the LM configs) whose forward runs
inside it. Both are the trainer's own jitted steps (`build.train_step`,
the teacher layout of `teachers.layout`: G - 1 stacked peers), with bf16 compute and f32 master
params as the configs say, and distillation on from step 0. Per step: the
measured median time, tokens/s, MFU against the device's peak
(`perf.peak_flops`: the bf16 table for GPUs and TPUs, a measured matmul peak
on a CPU), the teacher forward alone, and the G-way step over its floor
`baseline * (1 + (G - 1) * forward/step)`.

Sized for one large GPU (an H200: about 5 minutes for the default rows):

  pip install -e '.[cuda]'
  python experiments/bench_gpu.py [--sizes=125m,1b,8b] \
      [--groups=2] [--batch_size=8] [--steps=10] \
      [--set=model.attention_impl=cudnn] [--out=experiments/results/bench_gpu.json]

`--quick` takes the config's `quick` variant: what the tests run on a CPU.
"""

import os
import sys

from absl import app
from absl import flags

_SIZES = flags.DEFINE_list("sizes", ["125m", "1b", "8b"],
                           "Sizes of configs/lm.py (its size=... arg).")
_GROUPS = flags.DEFINE_integer("groups", 2, "G: the step distills from G - 1.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per step (0: the "
                              "config's).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first.")
_QUICK = flags.DEFINE_bool("quick", False, "The configs' :quick variants.")
_SET = flags.DEFINE_list("set", [], "Config overrides, key=value.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        "bench_gpu.json"), "Output JSON.")


def bench(size: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import bench_lib  # pylint: disable=g-import-not-at-top
  from codistill_jax import build  # pylint: disable=g-import-not-at-top
  from codistill_jax import config_lib  # pylint: disable=g-import-not-at-top
  from codistill_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from codistill_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from codistill_jax import perf  # pylint: disable=g-import-not-at-top
  from codistill_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  from codistill_jax import teachers as teachers_lib  # pylint: disable=g-import-not-at-top

  groups = _GROUPS.value
  config = bench_lib.load_config(
      "lm", f"size={size}" + (",quick" if _QUICK.value else ""))
  config_lib.apply_overrides(config, _SET.value)
  config.codistill.num_groups = groups
  config.codistill.burn_in_steps = 0  # The teachers' forward from step 0.
  config.codistill.alpha_ramp_steps = 0
  if _BATCH.value:
    config.data.batch_size = _BATCH.value
  device = jax.devices()[0]
  mesh = mesh_lib.make_mesh([device])
  datasets = data_lib.get_module(config.data.name).get_datasets(
      config, group=0, num_groups=groups, process_index=0, process_count=1)
  setup = build.build(config, datasets, mesh)
  example = next(iter(datasets.train(0)))
  batch = mesh_lib.shard_batch(example, mesh_lib.batch_sharding(mesh))
  init = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)
  layout = teachers_lib.layout(config, setup, example)  # G - 1 peers.
  codistill = build.train_step(config, setup, layout)
  baseline = build.train_step(config, setup)
  params = init(jax.random.PRNGKey(1)).params
  dtype = jnp.dtype(config.codistill.teacher_dtype)
  peers = jax.device_put(step_lib.Teachers(
      jax.tree.map(lambda x: jnp.stack([x.astype(dtype)] * (groups - 1)),
                   params), jnp.ones((groups - 1,), jnp.float32)),
                         layout.arg_shardings[0])
  teacher_params = jax.tree.map(lambda x: x[0], peers.params)
  forward = jax.jit(mesh_lib.traced_on(
      mesh, lambda p, x: setup.model.apply(p, x, train=False)))

  def timed(fn, *args) -> float:
    holder = [init(jax.random.PRNGKey(0))]

    def one():
      holder[0], m = fn(holder[0], *args)
      return m["loss"]

    for _ in range(_WARMUP.value):
      jax.block_until_ready(one())
    return bench_lib.median_time(one, _STEPS.value)

  base_s = timed(baseline, batch)
  g_s = timed(codistill, batch, peers)
  for _ in range(_WARMUP.value):
    jax.block_until_ready(forward(teacher_params, batch["inputs"]))
  fwd_s = bench_lib.median_time(
      lambda: forward(teacher_params, batch["inputs"]), _STEPS.value)
  unit, per_step = perf.describe(example)
  peak = perf.peak_flops(device)
  row = {"config": f"lm_{size}" + (":quick" if _QUICK.value else ""),
         "G": groups,
         "device": device.device_kind, "batch_size": config.data.batch_size,
         "seq_len": int(example["inputs"].shape[-1]),
         "params": sum(x.size for x in jax.tree.leaves(params)),
         "dtype": str(config.model.dtype),
         "teacher_dtype": str(config.codistill.teacher_dtype),
         "peak_flops": peak}
  for key, seconds, teachers in (("baseline", base_s, 0),
                                 ("codistill", g_s, groups - 1)):
    flops = perf.model_flops(setup.model, example, teachers)
    row[f"{key}_ms"] = 1e3 * seconds
    row[f"{key}_{unit}_per_s"] = per_step / seconds
    row[f"{key}_mfu"] = perf.mfu(flops, 1 / seconds, 1, peak)
  row["teacher_forward_ms"] = 1e3 * fwd_s
  row["floor_ms"] = 1e3 * (base_s + (groups - 1) * fwd_s)
  row["codistill_over_floor"] = g_s / (base_s + (groups - 1) * fwd_s)
  print(f"{row['config']:<16} {row['device']}: baseline "
        f"{row['baseline_ms']:.1f} ms ({perf.si(row[f'baseline_{unit}_per_s'])}"
        f" {unit}/s, MFU {100 * row['baseline_mfu']:.1f}%), G={groups} "
        f"{row['codistill_ms']:.1f} ms (MFU {100 * row['codistill_mfu']:.1f}%"
        f"), teacher forward {row['teacher_forward_ms']:.1f} ms, over floor "
        f"{row['codistill_over_floor']:.3f}", flush=True)
  return row


def main(argv):
  del argv
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  rows = []
  for size in _SIZES.value:
    name = f"lm_{size}"
    try:
      rows.append(bench(size))
    except jax.errors.JaxRuntimeError as e:
      # Out of device memory: this config and the larger ones do not fit.
      if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(
          e).lower():
        raise
      line = str(e).strip().splitlines()[0][:300]
      print(f"{name}: does not fit ({line})", flush=True)
      rows.append({"config": name, "G": _GROUPS.value, "error": line})
    bench_lib.write_json(_OUT.value, {"rows": rows})


if __name__ == "__main__":
  app.run(main)

r"""Student throughput: teacher service (Ray workers) vs in-process teacher.

Two-phase distillation from a heavier teacher, run by the real trainer with
`teacher_source='checkpoint'` (the teacher's forward inside the student's
jitted step, on the student's device) and with `teacher_source='service'`
(the teacher on W Ray workers, W = each value of --workers, targets streamed
into the batches), side by side in one invocation, on one machine. Reported:
student examples/s (median over the trainer's log windows after the first,
which holds compilation), the service / in-process ratio, and the workers,
Ray CPUs per worker and machine cores used.

EDL-Dist (Liu et al. 2022) reports up to 3.1x when teachers get their own
(otherwise idle) accelerators. Here every worker shares the same CPU cores as
the student, so the service can only move work around, and adds transfer and
scheduling cost: read the numbers with the core count beside them.

  python experiments/bench_service.py [--workloads=flights,fashion_mnist] \
      [--workers=1,2] [--steps=200]

Writes experiments/results/bench_service.json. Needs `pip install -e
.[service]`.
"""

import os
import sys
import tempfile
import time

from absl import app
from absl import flags

_WORKLOADS = flags.DEFINE_list("workloads", ["flights", "fashion_mnist"],
                               "Config files (see TEACHERS).")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Pool sizes to time.")
_STEPS = flags.DEFINE_integer("steps", 200, "Student steps per run.")
_WINDOW = flags.DEFINE_integer("window", 25, "Steps per timing window.")
_IN_FLIGHT = flags.DEFINE_integer("in_flight", 4, "Service in-flight depth.")
_REPEATS = flags.DEFINE_integer(
    "repeats", 2, "Rounds of all runs, interleaved (the machine is shared: "
    "the spread between rounds shows the noise).")
_WORKER_CPUS = flags.DEFINE_float("worker_cpus", 1.0,
                                  "Ray CPUs reserved per worker.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_service.json",
                           "Output JSON.")

# Workload -> (teacher overrides, teacher training steps): a teacher several
# times the student's forward cost, as in distillation practice. Throughput
# does not depend on how well the teacher is trained.
TEACHERS = {
    "flights": ({"model.hidden_sizes": (1024, 1024)}, 20),
    "fashion_mnist": ({"model_name": "resnet", "model": {
        "stage_sizes": (1, 1, 1), "width": 16}}, 20),
}


def _set(config, key, value):
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  if isinstance(value, dict):
    import ml_collections  # pylint: disable=g-import-not-at-top
    value = ml_collections.ConfigDict(value)
  node[leaf] = value


def _teacher(name: str, workdir: str):
  """Trains the workload's teacher briefly; returns (its config, its dir)."""
  import bench_lib  # pylint: disable=g-import-not-at-top
  from codistill_jax import train  # pylint: disable=g-import-not-at-top
  config = bench_lib.load_config(name, None)
  overrides, steps = TEACHERS[name]
  for k, v in overrides.items():
    _set(config, k, v)
  config.total_steps = steps
  config.log_every = config.eval_every = config.checkpoint_every = steps
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _student_rate(name: str, teacher, teacher_dir: str, source: str,
                  workers: int, workdir: str) -> dict:
  """Median student examples/s of one real run (first window dropped)."""
  import bench_lib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from codistill_jax import metrics  # pylint: disable=g-import-not-at-top
  from codistill_jax import train  # pylint: disable=g-import-not-at-top
  config = bench_lib.load_config(name, None)
  config.total_steps, config.log_every = _STEPS.value, _WINDOW.value
  config.eval_every = config.checkpoint_every = _STEPS.value
  cd = config.codistill
  cd.teacher_source, cd.teacher_checkpoint = source, teacher_dir
  cd.teacher_model_name = teacher.model_name
  cd.teacher_model.unlock()
  cd.teacher_model.update(teacher.model.to_dict())
  cd.burn_in_steps = 0
  cd.service.num_workers = workers
  cd.service.in_flight = _IN_FLIGHT.value
  cd.service.worker_cpus = _WORKER_CPUS.value
  t = time.perf_counter()
  train.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - t
  rows = [r for r in metrics.read_jsonl(
      os.path.join(workdir, "group_0", "metrics.jsonl")) if "steps_per_sec" in r]
  rate = float(np.median([r["steps_per_sec"] for r in rows[1:]]))
  out = {"config": name, "source": source,
         "workers": workers if source == "service" else 0,
         "worker_cpus": _WORKER_CPUS.value if source == "service" else 0,
         "batch_size": config.data.batch_size, "steps": _STEPS.value,
         "examples_per_s": rate * config.data.batch_size,
         "wall_s_incl_startup": wall}
  if source == "service":
    out["retries"] = rows[-1]["service/retries"]
    out["fallback_batches"] = rows[-1]["service/fallback_batches"]
  print(f"{name:<14} {source:<10} workers={out['workers']}  "
        f"{out['examples_per_s']:9.0f} examples/s  (wall {wall:.1f} s incl. "
        "start-up)", flush=True)
  return out


def main(argv):
  del argv
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import ray  # pylint: disable=g-import-not-at-top
  from codistill_jax.service import pool as pool_lib  # pylint: disable=g-import-not-at-top
  # One local cluster for every service run (started on loopback here, so
  # that its start-up is not timed into the first run).
  pool_lib.connect("", num_cpus=os.cpu_count())
  results = {
      "machine_cores": os.cpu_count(),
      # Other jobs on the machine skew every figure: recorded, not hidden.
      "load_avg_1m_at_start": os.getloadavg()[0],
      "student_devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
      "note": ("student, in-process teacher and every service worker share "
               "the same machine_cores CPU cores"),
      "rows": []}
  with tempfile.TemporaryDirectory() as root:
    for name in _WORKLOADS.value:
      teacher, teacher_dir = _teacher(name, os.path.join(root, name, "t"))
      runs = [("checkpoint", 0)] + [("service", int(w)) for w in _WORKERS.value]
      for r in range(_REPEATS.value):
        for source, w in runs:
          row = _student_rate(name, teacher, teacher_dir, source, w,
                              os.path.join(root, name, f"{source}_{w}_{r}"))
          results["rows"].append({**row, "round": r})
  # Per (config, source, workers): the median over rounds, and its ratio to
  # the in-process teacher's median.
  import numpy as np  # pylint: disable=g-import-not-at-top
  keys = sorted({(r["config"], r["source"], r["workers"])
                 for r in results["rows"]})
  results["summary"] = []
  for key in keys:
    rates = [r["examples_per_s"] for r in results["rows"]
             if (r["config"], r["source"], r["workers"]) == key]
    results["summary"].append({"config": key[0], "source": key[1],
                               "workers": key[2],
                               "examples_per_s": float(np.median(rates)),
                               "rounds": rates})
  for row in results["summary"]:
    base = next(b for b in results["summary"] if b["config"] == row["config"]
                and b["source"] == "checkpoint")
    row["over_in_process"] = row["examples_per_s"] / base["examples_per_s"]
    print(f"{row['config']:<14} {row['source']:<10} workers={row['workers']}"
          f"  median {row['examples_per_s']:9.0f} examples/s  "
          f"x{row['over_in_process']:.2f} of in-process", flush=True)
  results["load_avg_1m_at_end"] = os.getloadavg()[0]
  ray.shutdown()
  bench_lib.write_json(_OUT.value, results)


if __name__ == "__main__":
  app.run(main)

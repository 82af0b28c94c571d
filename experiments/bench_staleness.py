r"""The main job's teacher staleness with and without `codistill.max_staleness`.

Runs the README's main job (`experiments/launch_local.py`, one process per
group) side by side with the bound off and on, `--rounds` times each,
interleaved, and reports per setting: the distribution of the teachers'
staleness (the per-log-window mean of how many steps older than the student
each teacher was, pooled over groups and windows: median, p90, max; and the
largest single-update staleness), the time spent waiting for peers, and the
wall time of the whole run.

  python experiments/bench_staleness.py [--steps=1000] [--bound=100] \
      [--rounds=2] [--out=experiments/results/bench_staleness.json]
"""

import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

_STEPS = flags.DEFINE_integer("steps", 1000, "Steps per group.")
_BOUND = flags.DEFINE_integer("bound", 100, "max_staleness when on.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Runs of each setting.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        "bench_staleness.json"), "Where the numbers go.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(bound: int, steps: int) -> dict:
  sys.path.insert(0, ROOT)
  from codistill_jax import metrics  # pylint: disable=g-import-not-at-top
  from codistill_jax import paths  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "launch_local.py"),
           "--config=configs/flights_codistill.py", f"--workdir={workdir}",
           f"--config.total_steps={steps}", "--config.log_every=10",
           f"--config.eval_every={steps}", f"--config.checkpoint_every={steps}",
           f"--config.codistill.max_staleness={bound}", "--progress_every=0"]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    means, maxes, waited = [], [], []
    for g in (0, 1):
      rows = metrics.read_jsonl(paths.metrics_file(workdir, g))
      key = f"staleness/group_{1 - g}"
      means += [r[key] for r in rows if key in r]
      maxes += [r[f"staleness_max/group_{1 - g}"] for r in rows if key in r]
      waited += [r["peer_wait_s"] for r in rows if "peer_wait_s" in r][-1:]
  return {"bound": bound, "wall_s": wall, "windows": len(means),
          "staleness_median": float(np.median(means)),
          "staleness_p90": float(np.percentile(means, 90)),
          "staleness_window_max": float(np.max(means)),
          "staleness_update_max": float(np.max(maxes)),
          "peer_wait_s": float(sum(waited))}


def main(argv):
  del argv
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_lib  # pylint: disable=g-import-not-at-top
  runs = []
  for r in range(_ROUNDS.value):
    for bound in (0, _BOUND.value):  # Interleaved: the machine drifts.
      runs.append({"round": r, **one_run(bound, _STEPS.value)})
      x = runs[-1]
      print(f"round {r} max_staleness={bound or 'off':>4}: staleness median "
            f"{x['staleness_median']:.0f}, p90 {x['staleness_p90']:.0f}, max "
            f"{x['staleness_update_max']:.0f} steps; waited "
            f"{x['peer_wait_s']:.1f} s; wall {x['wall_s']:.1f} s", flush=True)
  off = [x for x in runs if not x["bound"]]
  on = [x for x in runs if x["bound"]]
  summary = {"steps": _STEPS.value, "bound": _BOUND.value,
             "exchange_every": 50,
             "wall_ratio_on_over_off": float(np.median(
                 [b["wall_s"] / a["wall_s"] for a, b in zip(off, on)])),
             "staleness_max_off": max(x["staleness_update_max"] for x in off),
             "staleness_max_on": max(x["staleness_update_max"] for x in on)}
  print(f"wall time with the bound / without: "
        f"{summary['wall_ratio_on_over_off']:.2f}x; largest staleness "
        f"{summary['staleness_max_off']:.0f} -> "
        f"{summary['staleness_max_on']:.0f} steps")
  bench_lib.write_json(_OUT.value, {"summary": summary, "runs": runs})


if __name__ == "__main__":
  app.run(main)

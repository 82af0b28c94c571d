r"""The critical batch size of a run over training (a command).

Trains `--config` with the gradient noise scale measured (noise_scale.py) when
a config is given, then prints group `--group`'s B_simple at every measurement
and writes it to WORKDIR/noise_scale_group_<g>.json.

  python -m codistill_jax.tools.noise_scale --config=configs/flights.py:quick \
      --workdir=/tmp/ns [--config.noise_scale.every=10]
  python -m codistill_jax.tools.noise_scale --workdir=/tmp/ns   # an existing run
"""

import json
import os
from typing import Any

from absl import flags
import numpy as np

from codistill_jax import cli
from codistill_jax import noise_scale
from codistill_jax import train
from codistill_jax.errors import ConfigError


def read_run(workdir: str, group: int = 0) -> list[dict[str, Any]]:
  """The noise-scale rows (step, b_simple, ...) of a run's group."""
  path = os.path.join(workdir, f"group_{group}", "metrics.jsonl")
  if not os.path.exists(path):
    raise ConfigError(f"--workdir={workdir}: no {path}; pass --config to "
                      "train a run that measures the noise scale")
  rows = []
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      if f"{noise_scale.PREFIX}b_simple" in row:
        rows.append(row)
  return rows


def report(workdir: str, group: int = 0) -> dict[str, Any]:
  """B_simple over training, as a table (printed) and a dict (returned)."""
  with open(os.path.join(workdir, "config.json")) as f:
    batch = json.load(f)["data"]["batch_size"]
  rows = read_run(workdir, group)
  if not rows:
    raise ConfigError(
        f"--workdir={workdir}: group {group} logged no noise scale; train "
        "with --config.noise_scale.every=N (or pass --config here)")
  print(f"group {group}, batch {batch} rows a step: B_simple (the critical "
        "batch size, rows) and the steps doubling the batch would save")
  print(f"{'step':>8} {'B_simple':>10} {'B/B_simple':>10} "
        f"{'S(B)/S(2B)':>10}")
  out = []
  for r in rows:
    b = r[f"{noise_scale.PREFIX}b_simple"]
    out.append({"step": r["step"], "b_simple": b,
                "doubling_speedup": r[f"{noise_scale.PREFIX}doubling_speedup"]})
    ratio = batch / b if b > 0 and np.isfinite(b) else float("nan")
    print(f"{r['step']:>8} {b:>10.1f} {ratio:>10.2f} "
          f"{out[-1]['doubling_speedup']:>10.2f}")
  late = [o["b_simple"] for o in out[len(out) // 2:]
          if np.isfinite(o["b_simple"])]
  summary = {"batch_size": batch, "rows": out,
             "b_simple_second_half_median": float(np.median(late))
             if late else float("inf")}
  b = summary["b_simple_second_half_median"]
  verdict = ("sync has saturated: a bigger synchronous batch buys few steps"
             if batch > b else "doubling the synchronous batch still pays")
  print(f"median B_simple over the second half: {b:.1f} rows; batch "
        f"{batch}: {verdict} (S(B)/S(2B) = "
        f"{noise_scale.doubling_speedup(b, batch):.2f})")
  with open(os.path.join(workdir, f"noise_scale_group_{group}.json"),
            "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv):
  del argv
  workdir = _WORKDIR.value
  if _CONFIG.value is not None:
    config = _CONFIG.value
    if not config.noise_scale.every:
      config.noise_scale.every = _EVERY.value or config.log_every
    train.train_and_evaluate(config, workdir)
  report(workdir, _GROUP.value)


if __name__ == "__main__":
  _CONFIG = cli.define_config_flag()
  _WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory "
                                 "(trained first when --config is given).")
  _GROUP = flags.DEFINE_integer("group", 0, "The group to report.")
  _EVERY = flags.DEFINE_integer(
      "every", 0, "With --config and noise_scale.every = 0: measure every "
      "this many steps (0: config.log_every).")
  cli.run(main, required=("workdir",))

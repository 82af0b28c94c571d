r"""The critical batch size of a run over training (a command).

Trains `--config` with the gradient noise scale measured (noise_scale.py) when
a config is given, then prints group `--group`'s B_simple at every measurement
and writes it to WORKDIR/noise_scale_group_<g>.json.

  python -m codistill_jax.tools.noise_scale --config=configs/flights.py:quick \
      --workdir=/tmp/ns [--config.noise_scale.every=10]
  python -m codistill_jax.tools.noise_scale --workdir=/tmp/ns   # an existing run

Checked before anything is trained or written (one `error:` line, exit code
2): without `--config`, `--workdir` is a run directory (its config.json
whole) and `--every` is not given (it only sets how often training
measures); `--group` is a group of the run (or of the config); the report's
file can be written. The run's metrics are read and checked as the plot
command reads them: a damaged line is named, file and line.
"""

import json
import os
from typing import Any

from absl import flags

from codistill_jax import cli
from codistill_jax.errors import ConfigError


def report_file(workdir: str, group: int) -> str:
  return os.path.join(workdir, f"noise_scale_group_{group}.json")


def read_run(workdir: str, group: int = 0) -> list[dict[str, Any]]:
  """The noise-scale rows (step, b_simple, ...) of a run's group."""
  # pylint: disable=g-import-not-at-top
  from codistill_jax import noise_scale
  from codistill_jax import paths
  from codistill_jax.tools import plot
  # pylint: enable=g-import-not-at-top
  rows = plot.load_run(workdir).get(f"group {group}")
  if rows is None:
    raise ConfigError(f"--workdir={workdir}: no "
                      f"{paths.metrics_file(workdir, group)}; pass --config "
                      "to train a run that measures the noise scale")
  key = f"{noise_scale.PREFIX}b_simple"
  return [r for r in rows if isinstance(r.get(key), (int, float))]


def report(workdir: str, group: int = 0) -> dict[str, Any]:
  """B_simple over training, as a table (printed) and a dict (returned)."""
  from codistill_jax import noise_scale  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  batch = cli.check_run(workdir).data.get("batch_size")
  if not isinstance(batch, int) or batch < 1:
    raise ConfigError(f"--workdir={workdir}: its config.json has no "
                      f"data.batch_size ({batch!r}); is the run damaged?")
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
                "doubling_speedup": r.get(
                    f"{noise_scale.PREFIX}doubling_speedup",
                    noise_scale.doubling_speedup(b, batch))})
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
  path = report_file(workdir, group)
  try:
    with open(path, "w") as f:
      json.dump(summary, f, indent=1)
  except OSError as e:
    raise ConfigError(f"cannot write {path} ({e.strerror}); make --workdir "
                      "writable") from None
  return summary


def main(argv):
  del argv
  workdir, group, config = _WORKDIR.value, _GROUP.value, _CONFIG.value
  cli.check_at_least(_EVERY.value, "--every", 0)
  if config is None:
    if _EVERY.value:
      raise ConfigError("--every sets how often training measures the noise "
                        "scale: it needs --config (drop it to report an "
                        "existing run)")
    num_groups, where = (cli.check_run(workdir).codistill.num_groups,
                         f"--workdir={workdir}")
  else:
    cli.check_output(workdir, "--workdir", directory=True)
    num_groups, where = config.codistill.num_groups, "--config"
  cli.check_group(group, num_groups, "--group", where)
  cli.check_output(report_file(workdir, group), "the report under --workdir")
  if config is not None:
    if not config.noise_scale.every:
      config.noise_scale.every = _EVERY.value or config.log_every
    from codistill_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, workdir)
  report(workdir, group)


if __name__ == "__main__":
  _CONFIG = cli.define_config_flag()
  _WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory "
                                 "(trained first when --config is given).")
  _GROUP = flags.DEFINE_integer("group", 0, "The group to report.")
  _EVERY = flags.DEFINE_integer(
      "every", 0, "With --config and noise_scale.every = 0: measure every "
      "this many steps (0: config.log_every).")
  cli.run(main, required=("workdir",))

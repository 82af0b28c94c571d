r"""Draws runs: loss, distillation, agreement, staleness per group (a command).

  python -m codistill_jax.tools.plot WORKDIR [WORKDIR ...] [--out=DIR] [--smooth=5]

Reads each run's `group_<g>/metrics.jsonl` (and `ensemble/`), writes one PNG
per panel into `--out` (default: the first run's `plots/`), and prints their
paths:

  loss.png          train loss (solid) and validation loss (dots), per group
  distill.png       the distillation term and alpha
  agreement.png     peer agreement (or |p - p_peer| for CTR) during training
  staleness.png     how many steps older than the student each teacher was
                    (mean over the log window; dashed: the window's max)
  eval.png          every validation/test metric at its eval steps

Several runs are drawn side by side on the same axes: one colour per run and
group; solid lines for the panel's main metric, dotted for its companion
(task loss beside the total, alpha beside the term, max beside mean), dots
for evaluations. Needs matplotlib (`pip install -e .[repro]`).
"""

import collections
import os
import re

from absl import flags

from codistill_jax import cli
from codistill_jax import metrics as metrics_lib
from codistill_jax import paths
from codistill_jax.errors import ConfigError

def load_run(workdir: str) -> dict[str, list[dict]]:
  """{'group 0': rows, ..., 'ensemble': rows} of a run directory."""
  if not os.path.isdir(workdir):
    raise ConfigError(f"{workdir}: no such run directory")
  out = {}
  for name in sorted(os.listdir(workdir)):
    m = re.fullmatch(r"group_(\d+)", name)
    path = (paths.metrics_file(workdir, int(m.group(1))) if m else
            os.path.join(workdir, name, "metrics.jsonl"))
    if (m or name == "ensemble") and os.path.exists(path):
      out[f"group {m.group(1)}" if m else "ensemble"] = (
          metrics_lib.read_jsonl(path))
  if not out:
    raise ConfigError(f"{workdir} holds no group_<g>/metrics.jsonl; is it a "
                      "codistill_jax run directory?")
  return out


def _series(rows, key, smooth=1):
  points = [(r["step"], r[key]) for r in rows if key in r]
  if smooth > 1 and len(points) > smooth:
    values = [v for _, v in points]
    points = [(s, sum(values[max(0, i - smooth + 1):i + 1]) /
               len(values[max(0, i - smooth + 1):i + 1]))
              for i, (s, _) in enumerate(points)]
  return [s for s, _ in points], [v for _, v in points]


def draw(runs: dict[str, dict[str, list[dict]]], out: str,
         smooth: int = 1) -> list[str]:
  """Writes the panels for `runs` ({label: load_run(...)}); returns paths."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError("the plot command needs matplotlib: pip install -e "
                      ".[repro]") from None
  os.makedirs(out, exist_ok=True)
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  keys = collections.OrderedDict()
  for groups in runs.values():
    for rows in groups.values():
      for r in rows:
        for k in r:
          keys.setdefault(k, None)

  def panel(name, title, picks, ylabel, logy=False):
    """picks: [(key, style suffix, marker)] drawn for every run and group."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn, colour = 0, 0
    for label, groups in runs.items():
      for group, rows in groups.items():
        for key, companion, marker in picks:
          matched = [k for k in keys if re.fullmatch(key, k)]
          for k in matched:
            steps, values = _series(rows, k, 1 if marker else smooth)
            if not steps:
              continue
            ax.plot(steps, values, linestyle="" if marker else (
                ":" if companion else "-"), marker=marker or None,
                    color=colours[colour % len(colours)],
                    label=f"{label} {group} {k}" if len(runs) > 1 else
                    f"{group} {k}")
            drawn += 1
        colour += 1
    if not drawn:
      plt.close(fig)
      return None
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    if logy:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = os.path.join(out, f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

  written = [
      panel("loss", "train and validation loss",
            [("loss", False, ""), ("task_loss", True, ""),
             (r"validation/(loss|log_loss)", False, "o")], "loss"),
      panel("distill", "distillation term and alpha",
            [("distill_loss", False, ""), ("alpha", True, "")], "value"),
      panel("agreement", "agreement with the teacher target",
            [("peer_agreement", False, ""), ("peer_abs_diff", False, "")],
            "agreement / |p - p_peer|"),
      panel("staleness", "teacher staleness (steps older than the student)",
            [(r"staleness/group_\d+", False, ""),
             (r"staleness_max/group_\d+", True, "")], "steps"),
      panel("eval", "evaluation",
            [(r"(validation|test|dev)/.*", False, "o")], "metric"),
  ]
  return [p for p in written if p]


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    raise ConfigError("name at least one run directory: python -m "
                      "codistill_jax.tools.plot WORKDIR [WORKDIR ...]")
  runs = {os.path.basename(os.path.normpath(w)) or w: load_run(w)
          for w in workdirs}
  out = flags.FLAGS.out or os.path.join(workdirs[0], "plots")
  for path in draw(runs, out, flags.FLAGS.smooth):
    print(path)


if __name__ == "__main__":
  # Flags only when run as a command: importing this module (tests, other
  # commands) defines none.
  flags.DEFINE_string("out", None, "Directory for the PNGs (default: the "
                      "first run's plots/).")
  flags.DEFINE_integer("smooth", 1, "Moving average over this many log rows "
                       "(1: none).")
  cli.run(main, positional=True)

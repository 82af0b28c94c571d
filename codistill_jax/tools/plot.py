r"""Draws runs as small multiples: evaluation, loss, distillation, agreement,
staleness (a command).

  python -m codistill_jax.tools.plot WORKDIR [WORKDIR ...] [--out=DIR] [--smooth=5]

Reads each run's `group_<g>/metrics.jsonl` (and `ensemble/`), writes one PNG
per figure into `--out` (default: the first run's `plots/`), and prints their
paths. Every figure is a row or grid of panels, one panel per quantity, with
step on the x axis (shared by the figure's panels) and the quantity, with its
unit, on the y axis:

  eval.png       one panel per split and metric the runs logged at their eval
                 steps (rows: splits, e.g. validation, test; columns: metrics,
                 e.g. log-loss, AUC, churn between the groups); the ensemble
                 (the run's `ensemble/` metrics) dashed in the panel of the
                 metric it is an ensemble of
  loss.png       training loss (total), training task loss, and the periodic
                 eval split's loss (with the ensemble's, dashed), on one y scale
  distill.png    the distillation term; its weight alpha
  agreement.png  peer agreement; |p - p_peer| (CTR)
  staleness.png  how many steps older than the student its teacher was: the
                 mean over the log window; the window's max

Styles: one run gives each group its own colour and marker, the ensemble black
and dashed. Several runs give each run its own colour family (blues, oranges,
greens, ...) and each group within it a shade and a marker, the ensemble the
family's darkest shade, dashed: runs compare by colour on the same axes. The
legend (run and group) sits outside the panels. `--smooth=N` averages training
series over N log rows; eval series are never smoothed. Needs matplotlib
(`pip install -e .[repro]`).
"""

import collections
import math
import os
import re

from absl import flags

from codistill_jax import cli
from codistill_jax import metrics as metrics_lib
from codistill_jax import paths
from codistill_jax.errors import ConfigError

ENSEMBLE = "ensemble"
BETWEEN = "between groups"  # Churn: a measure of the groups' disagreement.


def load_run(workdir: str) -> dict[str, list[dict]]:
  """{'group 0': rows, ..., 'ensemble': rows} of a run directory.

  Raises:
    ConfigError: `workdir` is not a run directory, or a metrics file is
      damaged (not JSON lines of {"step": int, ...}) or unreadable.
  """
  if not os.path.isdir(workdir):
    raise ConfigError(f"{workdir}: no such run directory" if not
                      os.path.exists(workdir) else
                      f"{workdir} is not a directory; name a run directory")
  found = []
  for name in os.listdir(workdir):
    m = re.fullmatch(r"group_(\d+)", name)
    if m:
      found.append((int(m.group(1)), f"group {m.group(1)}",
                    paths.metrics_file(workdir, int(m.group(1)))))
    elif name == "ensemble":
      found.append((math.inf, ENSEMBLE,
                    os.path.join(paths.ensemble_dir(workdir),
                                 "metrics.jsonl")))
  out = {}
  for _, label, path in sorted(found):
    if os.path.isfile(path):
      out[label] = _read(path)
  if not any(label != ENSEMBLE for label in out):
    raise ConfigError(f"{workdir} holds no group_<g>/metrics.jsonl; is it a "
                      "codistill_jax run directory?")
  return out


def _read(path: str) -> list[dict]:
  try:
    rows = metrics_lib.read_jsonl(path)
  except OSError as e:
    raise ConfigError(f"cannot read {path}: {e.strerror}") from None
  except ValueError as e:  # Names the file and line.
    raise ConfigError(f"{e}; the run's metrics are damaged: repair or remove "
                      "that line") from None
  for i, row in enumerate(rows):
    if not isinstance(row, dict) or not _number(row.get("step")):
      raise ConfigError(f"{path}:{i + 1} is not a metrics row (a JSON object "
                        "with a numeric \"step\"); the run's metrics are "
                        "damaged: repair or remove that line")
  return rows


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _series(rows, key, smooth=1):
  points = [(r["step"], r[key]) for r in rows if _number(r.get(key))]
  if smooth > 1 and len(points) > smooth:
    values = [v for _, v in points]
    points = [(s, sum(values[max(0, i - smooth + 1):i + 1]) /
               len(values[max(0, i - smooth + 1):i + 1]))
              for i, (s, _) in enumerate(points)]
  return [s for s, _ in points], [v for _, v in points]


# ----------------------------------------------------------------------------
# Evaluation metrics: which rows, which panel.
# ----------------------------------------------------------------------------

def _is_eval_row(row: dict) -> bool:
  """Rows written at eval steps: only `split/metric` keys (a training log row
  always has `loss`)."""
  keys = [k for k in row if k not in ("step", "time")]
  return bool(keys) and "loss" not in row and all("/" in k for k in keys)


def _eval_keys(groups: dict[str, list[dict]]):
  """[(series, row key, split, metric)] of a run's eval metrics, in order.

  A group's `split/m` goes to panel (split, m); the ensemble's
  `split/ensemble/m` to the panel of the groups' metric it is an ensemble of
  (its `loss` is the groups' `log_loss` for CTR); `split/churn/m` (the groups'
  disagreement) to its own panel.
  """
  group_keys = {k for series, rows in groups.items() if series != ENSEMBLE
                for r in rows if _is_eval_row(r) for k in r}
  out = collections.OrderedDict()
  for series, rows in groups.items():
    for r in rows:
      if not _is_eval_row(r):
        continue
      for k in r:
        if k in ("step", "time") or k.endswith("/batches"):
          continue  # batches: how many an eval_max_batches cap left.
        split, metric = k.split("/", 1)
        who = series
        if series == ENSEMBLE:
          if metric.startswith("ensemble/"):
            metric = metric[len("ensemble/"):]
            if (metric == "loss" and f"{split}/loss" not in group_keys and
                f"{split}/log_loss" in group_keys):
              metric = "log_loss"
          else:
            who = BETWEEN
        out.setdefault((who, k), (split, metric))
  return [(who, k, split, metric) for (who, k), (split, metric) in out.items()]


# Display names: (panel title, y label with its unit).
_METRIC_NAMES = {
    "log_loss": ("log-loss", "log-loss (nats)"),
    "loss": ("loss", "loss (nats)"),
    "auc": ("AUC", "AUC (ROC area)"),
    "accuracy": ("accuracy", "accuracy (fraction)"),
    "perplexity": ("perplexity", "perplexity"),
    "churn/mean_abs_diff": ("churn between groups", "mean |p_i - p_j|"),
    "churn/top1_disagreement": ("churn between groups",
                                "top-1 disagreement (fraction)"),
}


def _metric_name(metric: str) -> tuple[str, str]:
  return _METRIC_NAMES.get(metric, (metric.replace("_", " "), metric))


# ----------------------------------------------------------------------------
# Styles: runs by colour family, groups by shade and marker, ensemble dashed.
# ----------------------------------------------------------------------------

_FAMILIES = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")
_MARKERS = ("o", "s", "^", "v", "P", "X", "<", ">")


class _Styles:
  """The colour, marker and line style of every (run, series)."""

  def __init__(self, runs, plt):
    self.plt = plt
    self.runs = list(runs)
    self.groups = {label: sorted({int(s.split()[1]) for s in groups
                                  if s.startswith("group ")})
                   for label, groups in runs.items()}
    self.used = {}  # legend label -> (order, handle style)

  def label(self, run: str, series: str) -> str:
    return series if len(self.runs) == 1 else f"{run} · {series}"

  def __call__(self, run: str, series: str, variant: int = 0,
               name: str | None = None) -> dict:
    """`series`' style; `variant` > 0 (a group's second or third teacher)
    changes the line style, `name` the legend's name for it."""
    r = self.runs.index(run)
    groups = self.groups[run]
    if series.startswith("group "):
      g = int(series.split()[1])
      i = groups.index(g) if g in groups else g
      if len(self.runs) == 1:
        colour = self.plt.rcParams["axes.prop_cycle"].by_key()["color"][
            i % 10]
      else:
        span = max(len(groups) - 1, 1)
        colour = self.plt.get_cmap(_FAMILIES[r % len(_FAMILIES)])(
            0.45 + 0.35 * i / span if len(groups) > 1 else 0.65)
      style = dict(color=colour, marker=_MARKERS[i % len(_MARKERS)],
                   linestyle=("-", "-.", ":")[variant % 3], linewidth=1.6)
      order = (r, i, variant)
    else:
      colour = ("black" if len(self.runs) == 1 else
                self.plt.get_cmap(_FAMILIES[r % len(_FAMILIES)])(1.0))
      between = series == BETWEEN
      style = dict(color=colour, marker="*" if between else "D",
                   linestyle="-." if between else "--", linewidth=1.8)
      order = (r, math.inf, between)
    self.used.setdefault(self.label(run, name or series), (order, style))
    return style

  def legend_handles(self):
    from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
    items = sorted(self.used.items(), key=lambda kv: kv[1][0])
    return ([Line2D([], [], markersize=6, **style) for _, (_, style) in items],
            [label for label, _ in items])


# ----------------------------------------------------------------------------
# Figures.
# ----------------------------------------------------------------------------

def figures(runs: dict[str, dict[str, list[dict]]], smooth: int = 1):
  """{name: matplotlib Figure} for `runs` ({label: load_run(...)}).

  Each panel's axes has gid = the panel's key (e.g. 'validation/auc' in
  eval, 'loss' in loss); a figure is left out when no run logged any of it.
  """
  plt = _pyplot()
  out = {}
  evals = set()  # gids of panels of eval-step series.

  def figure(name, title, panels, rows=1, sharey=False, who="group",
             zero=False):
    """panels: [(gid, title, ylabel, [(run, series, steps, values, style)])]
    on a grid of `rows` rows (None: an empty cell); `who` names what
    the legend's lines are; `zero` draws y = 0."""
    cols = max(1, math.ceil(len(panels) / rows))
    fig, axes = plt.subplots(rows, cols, squeeze=False, sharex=True,
                             sharey=sharey, layout="constrained",
                             figsize=(3.9 * cols + 2.4, 3.0 * rows + 0.6))
    for ax, panel in zip(axes.flat, panels + [None] * cols * rows):
      if panel is None:
        fig.delaxes(ax)
        continue
      gid, panel_title, ylabel, lines = panel
      ax.set_gid(gid)
      for run, series, steps, values, kw in lines:
        # Eval series: a marker per eval; training series: ~8 per line.
        every = 1 if gid in evals else max(1, len(steps) // 8)
        ax.plot(steps, values, label=styles.label(run, series),
                markersize=5 if every == 1 else 4, markevery=every,
                **{**kw, "linewidth": kw["linewidth"] * (
                    1 if gid in evals else 0.75)})
      once = {s for _, _, steps, _, _ in lines for s in steps}
      if len(once) == 1:
        ax.text(0.02, 0.97, f"logged once, at step {once.pop():g}",
                transform=ax.transAxes, va="top", fontsize=8, color="0.35")
      ax.set_title(panel_title, fontsize=10)
      ax.set_xlabel("step")
      ax.set_ylabel(ylabel)
      ax.tick_params(labelbottom=True, labelleft=True)
      ax.grid(alpha=0.3)
      if zero:
        ax.axhline(0, color="0.5", linewidth=0.8, zorder=0)
    fig.suptitle(title, fontsize=12)
    handles, labels = _legend_of(fig, styles)
    fig.legend(handles, labels, loc="outside right center", fontsize=8,
               frameon=False,
               title=f"run · {who}" if len(runs) > 1 else
               None if who == "group" else who)
    out[name] = fig

  styles = _Styles(runs, plt)

  # Evaluation: a grid of splits x metrics.
  cells = collections.OrderedDict()
  for run, groups in runs.items():
    for who, key, split, metric in _eval_keys(groups):
      rows = groups[ENSEMBLE if who == BETWEEN else who]
      steps, values = _series(rows, key)
      if steps:
        cells.setdefault((split, metric), []).append(
            (run, who, steps, values, styles(run, who)))
  if cells:
    splits = list(dict.fromkeys(s for s, _ in cells))
    metrics = list(dict.fromkeys(m for _, m in cells))
    evals.update(f"{s}/{m}" for s, m in cells)
    grid = [(f"{s}/{m}", f"{s}: {_metric_name(m)[0]}", _metric_name(m)[1],
             cells[(s, m)]) if (s, m) in cells else None
            for s in splits for m in metrics]
    figure("eval", "evaluation at eval steps", grid, rows=len(splits))

  def training(key, smooth_it=True):
    """Lines of a training metric (regex) for every run and group."""
    lines = []
    for run, groups in runs.items():
      for series, rows in groups.items():
        if series == ENSEMBLE:
          continue
        keys = sorted({k for r in rows for k in r if re.fullmatch(key, k)})
        for variant, k in enumerate(keys):
          steps, values = _series(rows, k, smooth if smooth_it else 1)
          if steps:
            # Several teachers (3+ groups): a line style and a name each.
            name = (f"{series} ← {k.split('/')[-1].replace('_', ' ')}"
                    if len(keys) > 1 else series)
            lines.append((run, name, steps, values,
                          styles(run, series, variant, name)))
    return lines

  def periodic_loss():
    """The first eval split's loss of every run (groups and ensemble)."""
    lines, split = [], None
    for run, groups in runs.items():
      for who, key, s, metric in _eval_keys(groups):
        if metric in ("loss", "log_loss") and split in (None, s):
          split = s
          rows = groups[ENSEMBLE if who == BETWEEN else who]
          steps, values = _series(rows, key)
          if steps:
            lines.append((run, who, steps, values, styles(run, who)))
    return split, lines

  def simple(name, title, specs, **kw):
    panels = [(gid, t, y, lines) for gid, t, y, lines in specs if lines]
    if panels:
      figure(name, title, panels, **kw)

  task = training("task_loss")
  split, val = periodic_loss()
  evals.add(f"{split}/loss")
  simple("loss", "loss", [
      ("loss", "training loss (task + alpha · distillation)" if task else
       "training loss", "loss (nats)", training("loss")),
      ("task_loss", "training task loss", "loss (nats)", task),
      (f"{split}/loss", f"{split} loss (at eval steps)", "loss (nats)", val),
  ], sharey=True)
  simple("distill", "distillation", [
      ("distill_loss", "distillation term", "distill_loss (nats)",
       training("distill_loss")),
      ("alpha", "distillation weight alpha", "alpha (weight)",
       training("alpha", smooth_it=False)),
  ])
  simple("agreement", "agreement with the teacher", [
      ("peer_agreement", "peer agreement", "agreement (fraction)",
       training("peer_agreement")),
      ("peer_abs_diff", "|p - p_peer| (CTR)", "mean |p - p_peer|",
       training("peer_abs_diff")),
  ])
  simple("staleness", "teacher staleness (steps older than the student)", [
      ("staleness", "mean over the log window", "staleness (steps)",
       training(r"staleness/group_\d+")),
      ("staleness_max", "max over the log window", "staleness (steps)",
       training(r"staleness_max/group_\d+", smooth_it=False)),
  ], sharey=True, who="student group", zero=True)
  return out


def _legend_of(fig, styles):
  """The legend of what `fig` draws, in run, group, ensemble order."""
  drawn = {line.get_label() for ax in fig.axes for line in ax.get_lines()}
  handles, labels = styles.legend_handles()
  keep = [(h, l) for h, l in zip(handles, labels) if l in drawn]
  return [h for h, _ in keep], [l for _, l in keep]


def _pyplot():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError("the plot command needs matplotlib: pip install -e "
                      ".[repro]") from None
  return plt


def draw(runs: dict[str, dict[str, list[dict]]], out: str,
         smooth: int = 1) -> list[str]:
  """Writes the figures for `runs` ({label: load_run(...)}); returns paths.

  Raises:
    ConfigError: `out` is a file, or not a writable directory.
  """
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConfigError(f"--out={out} is a file; name a directory for the "
                      "PNGs")
  plt = _pyplot()
  written = []
  figs = figures(runs, smooth)
  try:
    os.makedirs(out, exist_ok=True)
    for name in ("eval", "loss", "distill", "agreement", "staleness"):
      if name in figs:
        path = os.path.join(out, f"{name}.png")
        figs[name].savefig(path, dpi=110)
        written.append(path)
  except OSError as e:
    raise ConfigError(f"--out={out}: cannot write {e.filename or out}: "
                      f"{e.strerror}; name a writable directory") from None
  finally:
    for fig in figs.values():
      plt.close(fig)
  return written


def run_labels(workdirs: list[str]) -> list[str]:
  """Short legend names of the runs: their directory names, or the whole
  paths where two runs share a name."""
  names = [os.path.basename(os.path.normpath(w)) or w for w in workdirs]
  if len(set(names)) < len(names):
    names = [os.path.normpath(w) for w in workdirs]
  return names


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    raise ConfigError("name at least one run directory: python -m "
                      "codistill_jax.tools.plot WORKDIR [WORKDIR ...]")
  runs = {label: load_run(w) for label, w in zip(run_labels(workdirs),
                                                  workdirs)}
  out = flags.FLAGS.out or os.path.join(workdirs[0], "plots")
  for path in draw(runs, out, flags.FLAGS.smooth):
    print(path)


if __name__ == "__main__":
  # Flags only when run as a command: importing this module (tests, other
  # commands) defines none.
  flags.DEFINE_string("out", None, "Directory for the PNGs (default: the "
                      "first run's plots/).")
  flags.DEFINE_integer("smooth", 1, "Moving average over this many log rows "
                       "of the training series (1: none).")
  cli.run(main, positional=True)

"""The plot command draws runs (codistill_jax/tools/plot.py)."""

import os
import subprocess
import sys

import pytest

from codistill_jax import metrics
from codistill_jax import paths
from codistill_jax.tools import plot
from codistill_jax.errors import ConfigError
from tests.test_train import ROOT


def _fake_run(root, name, groups=2, seed=0, ensemble=False, ctr=False):
  """A run directory with the metrics a codistillation run writes: eval rows
  every 50 steps on validation, and on test too at the last step; with
  `ensemble`, the ensemble's and the groups' churn in ensemble/ (as one
  process driving every group writes them); `ctr`: log-loss and AUC (the
  ensemble's log-loss is its `loss`), else loss and accuracy."""
  workdir = str(root / name)
  names = ("log_loss", "auc") if ctr else ("loss", "accuracy")
  for g in range(groups):
    w = metrics.MetricWriter(paths.group_dir(workdir, g))
    for step in range(10, 110, 10):
      row = {"loss": 1.0 / step + seed, "task_loss": 0.9 / step,
             "alpha": float(step > 30)}
      if step > 30:
        row.update({"distill_loss": 0.1, "peer_agreement": 0.8,
                    f"staleness/group_{1 - g}": 5.0,
                    f"staleness_max/group_{1 - g}": 9.0})
      w.write(step, row)
      if step % 50 == 0:
        splits = ("validation", "test") if step == 100 else ("validation",)
        w.write(step, {f"{s}/{m}": 0.5 + 0.01 * g + seed for s in splits
                       for m in names})
    w.close()
  if ensemble:
    w = metrics.MetricWriter(paths.ensemble_dir(workdir))
    churn = "mean_abs_diff" if ctr else "top1_disagreement"
    for step in (50, 100):
      splits = ("validation", "test") if step == 100 else ("validation",)
      w.write(step, {k: 0.4 + seed for s in splits for k in (
          f"{s}/ensemble/loss", f"{s}/ensemble/{names[1]}",
          f"{s}/churn/{churn}")})
    w.close()
  return workdir


def _legend(fig):
  return [t.get_text() for legend in fig.legends for t in legend.texts]


def test_draws_every_panel_of_one_and_several_runs(tmp_path):
  a, b = _fake_run(tmp_path, "a"), _fake_run(tmp_path, "b", seed=1)
  out = str(tmp_path / "plots")
  written = plot.draw({"a": plot.load_run(a), "b": plot.load_run(b)}, out)
  names = sorted(os.path.basename(p) for p in written)
  assert names == ["agreement.png", "distill.png", "eval.png", "loss.png",
                   "staleness.png"]
  for p in written:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(p) > 10_000


def test_a_baseline_run_has_no_distillation_panels(tmp_path):
  w = metrics.MetricWriter(paths.group_dir(str(tmp_path / "plain"), 0))
  w.write(10, {"loss": 1.0})
  w.close()
  written = plot.draw({"plain": plot.load_run(str(tmp_path / "plain"))},
                      str(tmp_path / "p"))
  assert [os.path.basename(p) for p in written] == ["loss.png"]


@pytest.mark.slow  # A subprocess: the quick subset runs no CLI.
def test_the_command_prints_the_paths_and_refuses_a_non_run(tmp_path):
  workdir = _fake_run(tmp_path, "run")
  result = subprocess.run([sys.executable, "-m", "codistill_jax.tools.plot",
                           workdir], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.split()
  assert lines and all(os.path.exists(p) and p.startswith(
      os.path.join(workdir, "plots")) for p in lines)
  with pytest.raises(ConfigError, match="no group_<g>/metrics.jsonl"):
    plot.load_run(str(tmp_path))


def _eval_panels_logged(workdir):
  """{'split/metric'} of every eval row the run wrote: group rows' keys, and
  the ensemble's `split/ensemble/m` in the panel of the groups' metric m (its
  `loss` in the groups' `log_loss` where they log that)."""
  rows = {name: metrics.read_jsonl(os.path.join(workdir, name,
                                                "metrics.jsonl"))
          for name in os.listdir(workdir)}
  keys = {k for name, rs in rows.items() if name != "ensemble" for r in rs
          if "loss" not in r for k in r if k not in ("step", "time")}
  for r in rows.get("ensemble", []):
    for k in r:
      if k not in ("step", "time"):
        split, metric = k.split("/", 1)
        metric = metric.removeprefix("ensemble/")
        if metric == "loss" and f"{split}/log_loss" in keys:
          metric = "log_loss"
        keys.add(f"{split}/{metric}")
  return keys


@pytest.mark.parametrize("ctr", [False, True])
def test_the_eval_figure_has_a_panel_per_metric_and_a_dashed_ensemble(
    tmp_path, ctr):
  workdir = _fake_run(tmp_path, "run", ensemble=True, ctr=ctr)
  fig = plot.figures({"run": plot.load_run(workdir)})["eval"]
  expected = _eval_panels_logged(workdir)
  assert len(expected) == 6  # validation and test: 2 metrics and churn.
  assert sorted(ax.get_gid() for ax in fig.axes) == sorted(expected)
  assert len(fig.axes) == len(expected)
  for ax in fig.axes:
    split, metric = ax.get_gid().split("/", 1)
    assert ax.get_xlabel() == "step" and ax.get_ylabel()
    assert split in ax.get_title()
    labels = {line.get_label(): line for line in ax.get_lines()}
    if metric.startswith("churn/"):
      assert list(labels) == ["between groups"]
      continue
    # Each group a solid line with markers, the ensemble dashed.
    assert set(labels) == {"group 0", "group 1", "ensemble"}
    assert labels["ensemble"].get_linestyle() == "--"
    for g in ("group 0", "group 1"):
      assert labels[g].get_linestyle() == "-"
      assert labels[g].get_marker() not in (None, "", "None")
    assert len({labels[g].get_color() for g in labels}) == 3
  legend = _legend(fig)
  assert legend == ["group 0", "group 1", "ensemble", "between groups"]


def test_several_runs_are_told_apart_by_legend_and_style(tmp_path):
  a = _fake_run(tmp_path, "a", ensemble=True)
  b = _fake_run(tmp_path, "b", seed=1)  # One process per group: no ensemble.
  c = _fake_run(tmp_path, "c", seed=2, ensemble=True)
  figs = plot.figures({name: plot.load_run(w) for name, w in
                       zip("abc", (a, b, c))})
  want = {f"{run} · {series}" for run in "abc"
          for series in ("group 0", "group 1")}
  assert set(_legend(figs["eval"])) == want | {
      f"{run} · {s}" for run in "ac" for s in ("ensemble", "between groups")}
  for name, fig in figs.items():
    legend = _legend(fig)
    assert len(legend) == len(set(legend)), name
    assert want <= set(legend), name
    fig.canvas.draw()  # Lays the figure out: where the legend lands.
    for ax in fig.axes:
      # One line per run and group in every panel, each with its own look,
      # and every line's name in the figure's legend.
      looks = {}
      for line in ax.get_lines():
        if line.get_label().startswith("_"):
          continue  # Unnamed: a reference line (staleness 0).
        assert line.get_label() in legend, (name, line.get_label())
        looks.setdefault((str(line.get_color()), line.get_marker(),
                          line.get_linestyle()), []).append(line.get_label())
      assert all(len(v) == 1 for v in looks.values()), (name, looks)
      # The legend sits outside the panels: it covers no data.
      for legend_box in fig.legends:
        box = legend_box.get_window_extent()
        assert not box.overlaps(ax.get_window_extent()), (name, ax.get_gid())
  # The runs' lines differ in colour, group by group.
  panel = next(ax for ax in figs["eval"].axes
               if ax.get_gid() == "validation/loss")
  colours = {line.get_label(): line.get_color() for line in panel.get_lines()}
  for g in ("group 0", "group 1"):
    assert len({str(colours[f"{r} · {g}"]) for r in "abc"}) == 3


@pytest.mark.slow  # Subprocesses.
@pytest.mark.parametrize("case", ["damaged", "not_a_run", "out_is_a_file"])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, case):
  workdir = _fake_run(tmp_path, "run")
  args = [workdir]
  if case == "damaged":
    with open(paths.metrics_file(workdir, 1), "a") as f:
      f.write("{not json\n")
      f.write('{"step": 200, "loss": 1.0}\n')
  elif case == "not_a_run":
    os.makedirs(tmp_path / "empty" / "group_0")
    args = [str(tmp_path / "empty")]
  else:
    (tmp_path / "file").write_text("")
    args += [f"--out={tmp_path / 'file'}"]
  result = subprocess.run([sys.executable, "-m", "codistill_jax.tools.plot",
                           *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert {"damaged": "metrics.jsonl:13 is not a JSON line",
          "not_a_run": "no group_<g>/metrics.jsonl",
          "out_is_a_file": "is a file"}[case] in lines[0]


def test_rows_that_are_json_but_not_metrics_are_refused(tmp_path):
  workdir = _fake_run(tmp_path, "run")
  with open(paths.metrics_file(workdir, 0), "a") as f:
    f.write('{"loss": 1.0}\n')  # No step.
  with pytest.raises(ConfigError, match=r"metrics.jsonl:13 is not a metrics"):
    plot.load_run(workdir)

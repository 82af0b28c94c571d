r"""Strong-to-weak and weak-to-strong: a large and a small model codistilling.

Does the small model gain from the large one (strong-to-weak), and the large
from the small (weak-to-strong)? Per seed, four runs of the same two groups
(group 0 large, group 1 small; each on its own half of the data, the same
steps):

  alone           both alpha 0: each trained alone (no distillation term)
  both            codistillation both ways
  strong_to_weak  the large group alpha 0: only the small one distils
  weak_to_strong  the small group alpha 0: only the large one distils

A group with alpha 0 is exactly its alone-run (tests/test_groups.py), so the
one-way runs also repeat the alone figures of the group that does not learn.

  python experiments/hetero_study.py --workload=ctr [--seeds=3]
  python experiments/hetero_study.py --workload=lm --seeds=3

Workloads: 'ctr' (configs/flights_hetero.py: a 256-128 and a 64-unit MLP,
1000 steps), 'lm' (configs/english_lm_hetero.py: a 4-layer and a 1-layer
llama on the English corpus). `--quick` runs the configs' `:quick` sizes (a
test). Seed-major and resumable: a point whose run finished is read, not
rerun, so a partial study is a complete picture at fewer seeds. Writes
experiments/results/hetero_study_<workload>.json and prints the table.
"""

import json
import os
import subprocess
import sys

from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lib  # noqa: E402  pylint: disable=g-bad-import-order
from codistill_jax import cli  # noqa: E402
from codistill_jax import metrics  # noqa: E402
from codistill_jax import paths  # noqa: E402
from codistill_jax.errors import ConfigError  # noqa: E402

WORKLOADS = {
    "ctr": ("configs/flights_hetero.py", "log_loss", "auc"),
    "lm": ("configs/english_lm_hetero.py", "loss", "accuracy"),
}
METHODS = {
    "alone": {"group.g0.codistill.alpha": 0.0,
              "group.g1.codistill.alpha": 0.0},
    "both": {},
    "strong_to_weak": {"group.g0.codistill.alpha": 0.0},
    "weak_to_strong": {"group.g1.codistill.alpha": 0.0},
}
GROUPS = {0: "large", 1: "small"}

_WORKLOAD = flags.DEFINE_enum("workload", "ctr", list(WORKLOADS),
                              "Which pair of models.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds (seed-major order).")
_QUICK = flags.DEFINE_bool("quick", False, "The configs' :quick sizes.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(_ROOT, "experiments", "results"),
    "Where the JSON goes.")
_RUNS = flags.DEFINE_string(
    "runs", "/tmp/codistill_hetero_study", "Where the runs' workdirs go "
    "(one per seed and method; a finished one is read, not rerun).")
_REPORT = flags.DEFINE_string(
    "report", os.path.join(_ROOT, "experiments", "REPORT.md"),
    "REPORT.md to put the study's section in ('': none; never with --quick).")
_EXTRA = flags.DEFINE_multi_string(
    "override", [], "More config overrides for every run, 'a.b=value' "
    "(e.g. data paths).")


def _final(workdir: str, group: int) -> dict | None:
  """The group's last eval row with test metrics (None: not finished)."""
  path = paths.metrics_file(workdir, group)
  if not os.path.exists(path):
    return None
  rows = [r for r in metrics.read_jsonl(path) if any(
      k.startswith("test/") for k in r)]
  return rows[-1] if rows else None


def run_point(config: str, workdir: str, overrides: dict,
              extra: list[str]) -> None:
  """One run of both groups in one process on 2 CPU devices."""
  if all(_final(workdir, g) for g in GROUPS):
    return  # Done before: resumable.
  argv = [sys.executable, "-m", "codistill_jax.main", f"--config={config}",
          f"--workdir={workdir}", "--config.codistill.exchange_blocking=True",
          *[f"--config.{k}={v}" for k, v in overrides.items()],
          *[f"--config.{o}" for o in extra]]
  env = {**os.environ, "PYTHONPATH": _ROOT, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "run.log"), "w") as log:
    code = subprocess.call(argv, env=env, cwd=_ROOT, stdout=log,
                           stderr=subprocess.STDOUT)
  if code:
    raise RuntimeError(f"{' '.join(argv)} exited {code}; see "
                       f"{workdir}/run.log")


def summarize(points: list[dict], loss: str, score: str) -> dict:
  """Per group and method: mean and spread of the test metrics, and the
  per-seed change against the group alone."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = {}
  for g, name in GROUPS.items():
    alone = {p["seed"]: p["groups"][str(g)] for p in points
             if p["method"] == "alone"}
    for method in METHODS:
      rows = [p for p in points if p["method"] == method]
      if not rows:
        continue
      vals = np.array([p["groups"][str(g)][f"test/{loss}"] for p in rows])
      scores = np.array([p["groups"][str(g)][f"test/{score}"] for p in rows])
      deltas = np.array([p["groups"][str(g)][f"test/{loss}"] -
                         alone[p["seed"]][f"test/{loss}"] for p in rows
                         if p["seed"] in alone])
      out[f"{name}/{method}"] = {
          "seeds": len(rows), f"test_{loss}_mean": float(vals.mean()),
          f"test_{loss}_std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
          f"test_{score}_mean": float(scores.mean()),
          "delta_vs_alone_mean": float(deltas.mean()) if len(deltas) else None,
          "delta_vs_alone_std": (float(deltas.std(ddof=1))
                                 if len(deltas) > 1 else 0.0)}
  return out


def verdict(summary: dict, loss: str, who: str, method: str) -> str:
  """'gains' / 'loses' / 'no clear change' for a group under a method: the
  per-seed change against alone, beyond two standard deviations."""
  s = summary.get(f"{who}/{method}")
  if not s or s["delta_vs_alone_mean"] is None:
    return "not measured"
  d, sd = s["delta_vs_alone_mean"], s["delta_vs_alone_std"]
  word = ("gains" if d < -2 * sd and d < 0 else
          "loses" if d > 2 * sd and d > 0 else "no clear change")
  return (f"{word} ({d:+.4f} ± {sd:.4f} test {loss} vs alone, "
          f"{s['seeds']} seeds)")


def section(result: dict, loss: str, score: str) -> str:
  """The study's REPORT.md section, between its markers."""
  w, summary = result["workload"], result["summary"]
  lines = [f"<!-- hetero_study:{w} -->",
           f"## Groups that differ: strong-to-weak and weak-to-strong ({w})",
           "", f"`{result['command']}` (config `{result['config']}`; group 0 "
           "the large model, group 1 the small one, each on its own half of "
           "the training data for the same steps; every run of a seed has "
           "the same data and init per group). A group with alpha 0 is "
           "exactly its alone-run, so it repeats the alone figure.", "",
           f"Alone, the large model reaches "
           f"{summary['large/alone'][f'test_{loss}_mean']:.4f} and the small "
           f"{summary['small/alone'][f'test_{loss}_mean']:.4f} test {loss}: "
           "'strong' and 'weak' here are sizes; whether the large one is "
           "also the better model alone is that comparison.", "",
           f"- strong-to-weak: the small model "
           f"{verdict(summary, loss, 'small', 'strong_to_weak')}",
           f"- weak-to-strong: the large model "
           f"{verdict(summary, loss, 'large', 'weak_to_strong')}",
           f"- both ways: large {verdict(summary, loss, 'large', 'both')}; "
           f"small {verdict(summary, loss, 'small', 'both')}", "",
           f"| group / method | seeds | test {loss} (mean ± std) | "
           f"test {score} | change vs alone (per seed) |",
           "| --- | --- | --- | --- | --- |"]
  for key, v in summary.items():
    d = v["delta_vs_alone_mean"]
    lines.append(
        f"| {key} | {v['seeds']} | {v[f'test_{loss}_mean']:.4f} ± "
        f"{v[f'test_{loss}_std']:.4f} | {v[f'test_{score}_mean']:.4f} | "
        + (f"{d:+.4f} ± {v['delta_vs_alone_std']:.4f}" if d is not None
           else "") + " |")
  lines += ["", f"<!-- /hetero_study:{w} -->"]
  return "\n".join(lines)


def main(argv):
  del argv
  cli.check_at_least(_SEEDS.value, "--seeds")
  for o in _EXTRA.value:
    if "=" not in o:
      raise ConfigError(f"--override={o}: write it as a.b=value")
  cli.check_output(_OUT.value, "--out", directory=True)
  config_file, loss, score = WORKLOADS[_WORKLOAD.value]
  config = config_file + (":quick" if _QUICK.value else "")
  tag = _WORKLOAD.value + ("_quick" if _QUICK.value else "")
  runs = os.path.join(_RUNS.value, tag)
  points = []
  for seed in range(_SEEDS.value):  # Seed-major: partial = fewer seeds.
    for method, overrides in METHODS.items():
      workdir = os.path.join(runs, f"seed{seed}_{method}")
      run_point(config, workdir, {**overrides, "seed": seed}, _EXTRA.value)
      groups = {}
      for g in GROUPS:
        row = _final(workdir, g)
        groups[str(g)] = {k: v for k, v in row.items()
                          if k.startswith(("test/", "validation/"))}
      points.append({"seed": seed, "method": method, "groups": groups})
      print(f"seed {seed} {method:15s} " + "  ".join(
          f"{GROUPS[g]} test/{loss} {groups[str(g)][f'test/{loss}']:.4f}"
          for g in GROUPS), flush=True)
  summary = summarize(points, loss, score)
  result = {"workload": _WORKLOAD.value, "config": config,
            "command": " ".join(["python", "experiments/hetero_study.py",
                                 *sys.argv[1:]]),
            "points": points, "summary": summary}
  path = os.path.join(_OUT.value, f"hetero_study_{tag}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"\n{'group/method':28s} {'test ' + loss:>18s} {'vs alone':>18s}")
  for key, s in summary.items():
    delta = s["delta_vs_alone_mean"]
    print(f"{key:28s} {s[f'test_{loss}_mean']:.4f} ± "
          f"{s[f'test_{loss}_std']:.4f}   " +
          (f"{delta:+.4f} ± {s['delta_vs_alone_std']:.4f}"
           if delta is not None else ""))
  print(f"wrote {path}")
  if _REPORT.value and not _QUICK.value:
    bench_lib.put_section(_REPORT.value, section(result, loss, score),
                          f"hetero_study:{_WORKLOAD.value}")
    print(f"updated {_REPORT.value}")


if __name__ == "__main__":
  cli.run(main)

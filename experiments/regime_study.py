r"""Anil et al.'s claim where it lives: past the critical batch size.

Two phases, every run a plain `python -m codistill_jax.main` command
(resumable: a finished run has WORKDIR/done.json and is skipped):

  1. The sync ladder: one group at B0, 2 B0, 4 B0, ... with the gradient
     noise scale logged (`config.noise_scale`). Steps to the target for each
     B; the saturated batch B is the smallest whose doubling cuts the steps
     by less than --saturation (1.15x), checked against B_simple.
  2. At that B, each seed: sync B, sync 2B, codistilled 2 x B, averaged
     2 x B (DiLoCo: Nesterov outer step on the mean delta), and with
     --four, 4 x B of each. Steps and examples to the target, final quality,
     and the bytes each worker moves per step.

  python experiments/regime_study.py                       # Fashion-MNIST MLP
  python experiments/regime_study.py --preset=lm           # the kernel-docs LM
  python experiments/regime_study.py --preset=gpu_lm       # one H200, < 8 min
  python experiments/regime_study.py --preset=tiny --root=/tmp/rs  # smoke test

Writes experiments/results/regime_study_<preset>.json, a plot into
experiments/report/, and its section of experiments/REPORT.md (between
`<!-- regime_study:<preset> -->` markers; repro_report keeps it).
"""

import argparse
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

import bench_lib  # pylint: disable=g-bad-import-order
from repro_report import steps_to  # pylint: disable=g-bad-import-order

HERE = os.path.dirname(os.path.abspath(__file__))
_ENV = dict(os.environ)  # The runs' environment (as this process got it).
REPO = os.path.dirname(HERE)


@dataclasses.dataclass(frozen=True)
class Preset:
  config: str  # Config file (relative to the repository).
  base: dict  # Overrides of every run.
  batches: tuple  # The sync ladder's batch sizes.
  target_key: str  # Validation metric to reach ('validation/loss').
  # ... at or below this value; None: the largest of the ladder's best
  # values (a target every sync batch reaches, late in its run).
  target: float | None
  seeds: tuple = (0, 1)
  exchange_every: int = 10  # H of codistillation and averaging.
  extra_targets: tuple = ()  # The ladder's gains at these too (report).
  # Groups as one process each (experiments/launch_local.py), sharing the
  # devices: how G groups share one GPU. Else G groups in one process.
  launcher: bool = False
  unit: str = "images"  # Of one row of a batch.
  rows: int = 1  # Units in one row (an LM window's tokens).


PRESETS = {
    "fashion": Preset(
        config="experiments/bench_models/fashion_mlp.py",
        base={"total_steps": 400, "eval_every": 5, "log_every": 10,
              "checkpoint_every": 400, "optimizer.schedule": "constant",
              "optimizer.warmup_steps": 10, "optimizer.learning_rate": 2e-3,
              "optimizer.weight_decay": 0.0, "noise_scale.every": 5,
              "codistill.burn_in_steps": 20},
        batches=(256, 512, 1024, 2048, 4096, 8192),
        target_key="validation/loss", target=0.38, seeds=(0, 1, 2),
        extra_targets=(0.42, 0.35)),
    # The packed subword LM (configs/english_lm.py: the llama decoder on
    # the kernel docs, 8k BPE pieces, 64-token windows).
    "lm": Preset(
        config="configs/english_lm.py",
        base={"total_steps": 400, "eval_every": 20, "log_every": 20,
              "checkpoint_every": 400, "optimizer.schedule": "constant",
              "optimizer.warmup_steps": 20, "noise_scale.every": 10,
              "eval_max_batches": 4, "codistill.burn_in_steps": 40},
        batches=(8, 16, 32, 64), target_key="validation/loss",
        target=None, seeds=(0,), exchange_every=20, unit="tokens", rows=64),
    # One large GPU (H200-class): the LM study at ~30-100x the CPU scale,
    # configs/lm.py's 125m, its default size (bf16 matmuls over f32
    # params), on 1k-token windows, groups as processes sharing the device.
    # Sized by estimate (~0.1-0.2 s a step at B = 64 x 1k tokens, a few
    # seconds of compile a run; ~8 runs), not run yet: no device was lent.
    "gpu_lm": Preset(
        config="configs/lm.py",  # size=125m; smoke() adds :quick.
        base={"total_steps": 300, "eval_every": 20, "log_every": 20,
              "checkpoint_every": 300, "optimizer.schedule": "constant",
              "optimizer.warmup_steps": 20, "noise_scale.every": 10,
              "eval_max_batches": 4, "codistill.burn_in_steps": 40,
              "data.seq_len": 1024},
        batches=(8, 16, 32, 64), target_key="validation/loss", target=None,
        seeds=(0,), exchange_every=20, launcher=True, unit="tokens",
        rows=1024),
}

def _methods(b: int, h: int, four: bool) -> dict[str, tuple[dict, int]]:
  """name -> (config overrides, groups) of each method at per-group batch b.

  Averaging runs twice: DiLoCo's outer Nesterov step (lr 0.7, momentum 0.9:
  the config's default, tuned by Douillard et al. for H ~ 500) and plain
  averaging (outer SGD at lr 1: local SGD).
  """
  peers = lambda g: {"data.batch_size": b, "codistill.num_groups": g,
                     "codistill.exchange_every": h,
                     "codistill.exchange_blocking": True}
  diloco = {"codistill.method": "average"}
  local_sgd = {"codistill.method": "average",
               "codistill.averaging.outer_optimizer": "sgd",
               "codistill.averaging.outer_learning_rate": 1.0}
  out = {
      "sync B": ({"data.batch_size": b}, 1),
      "sync 2B": ({"data.batch_size": 2 * b}, 1),
      "codistill 2xB": (peers(2), 2),
      "codistill 2xB shared": ({**peers(2), "data.partition": "shared"}, 2),
      "average 2xB (DiLoCo)": ({**peers(2), **diloco}, 2),
      "average 2xB (local SGD)": ({**peers(2), **local_sgd}, 2),
  }
  if four:
    out.update({
        "sync 4B": ({"data.batch_size": 4 * b}, 1),
        "codistill 4xB": (peers(4), 4),
        "average 4xB (local SGD)": ({**peers(4), **local_sgd}, 4),
    })
  return out


def _name(overrides: dict) -> str:
  text = "_".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(
      overrides.items()))
  return re.sub(r"[^\w=.,-]", "", text)[:150]


def run(preset: Preset, root: str, overrides: dict, groups: int,
        log) -> str:
  """Runs one point (unless done); returns its workdir."""
  workdir = os.path.join(root, _name(overrides))
  if os.path.exists(os.path.join(workdir, "done.json")):
    return workdir
  main = (["experiments/launch_local.py"] if preset.launcher and groups > 1
          else ["-m", "codistill_jax.main"])
  cmd = [sys.executable, *main,
         f"--config={preset.config}", f"--workdir={workdir}",
         *[f"--config.{k}={v}" for k, v in {**preset.base,
                                             **overrides}.items()]]
  env = {**_ENV, "PYTHONPATH": os.pathsep.join([REPO, HERE])}
  if env.get("JAX_PLATFORMS", "cpu") == "cpu":
    # One CPU device per group of the process (the launcher sets its own).
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   env.get("XLA_FLAGS", ""))
    count = 1 if preset.launcher else groups
    env["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count="
                        f"{count}").strip()
  t = time.time()
  log(f"run: {' '.join(cmd[1:])}")
  done = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True)
  if done.returncode:
    tail = "\n".join(done.stderr.strip().splitlines()[-5:])
    raise SystemExit(f"run failed (exit {done.returncode}): "
                     f"{' '.join(cmd[1:])}\n{tail}")
  with open(os.path.join(workdir, "done.json"), "w") as f:
    json.dump({"command": cmd[1:], "groups": groups,
               "wall_s": time.time() - t}, f)
  return workdir


def _rows(workdir: str, g: int) -> list[dict]:
  with open(os.path.join(workdir, f"group_{g}", "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def measure(preset: Preset, workdir: str, groups: int) -> dict:
  """Steps to target (mean of the groups' curves), final quality, B_simple."""
  curves = []
  for g in range(groups):
    curves.append({r["step"]: r[preset.target_key] for r in _rows(workdir, g)
                   if preset.target_key in r})
  steps = sorted(set.intersection(*[set(c) for c in curves]))
  mean = {s: float(np.mean([c[s] for c in curves])) for s in steps}
  rows0 = _rows(workdir, 0)
  b_simple = [r["noise_scale/b_simple"] for r in rows0
              if "noise_scale/b_simple" in r]
  return {"steps_to_target": (None if preset.target is None else
                              steps_to(mean, preset.target)),
          "final": mean[steps[-1]], "curve": mean,
          "b_simple": b_simple, "groups": groups}


def comm_bytes_per_step(method: str, groups: int, mult: int,
                        param_bytes: int, h: int) -> float:
  """Bytes one worker sends plus receives per step, by the method's model.

  Sync at a batch of `mult` x B stands for `mult` workers of B each: a ring
  all-reduce of the gradient, 2 (n-1)/n of the params out and as much in per
  step; codistillation and averaging: every H steps one publish and
  G - 1 reads of the params.
  """
  if method.startswith("sync"):
    return 2 * 2 * (mult - 1) / mult * param_bytes
  return groups * param_bytes / h


def _param_bytes(workdir: str) -> int:
  """Bytes of one group's params, from its newest checkpoint's metadata."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # This process reads only.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt = os.path.join(workdir, "group_0", "checkpoints")
  step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(os.path.join(ckpt, str(step), "default")
                          ).item_metadata.tree
  leaves = []

  def walk(node):
    if isinstance(node, dict):
      for v in node.values():
        walk(v)
    elif hasattr(node, "shape"):
      leaves.append(node)

  walk(tree["params"])
  return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize
                 for a in leaves))


def smoke(preset: Preset) -> Preset:
  """The preset at toy size (its config's `:quick`, a dozen steps): the
  tests run each preset's whole pipeline this way on a CPU."""
  config = preset.config if ":" in preset.config else preset.config + ":quick"
  small = {"total_steps": 12, "eval_every": 4, "log_every": 4,
           "checkpoint_every": 12, "noise_scale.every": 2,
           "codistill.burn_in_steps": 2, "optimizer.warmup_steps": 0}
  # The quick config's own sizes stand (a preset's sequence length is not
  # a toy's).
  base = {k: v for k, v in preset.base.items()
          if k not in small and k != "data.seq_len"}
  return dataclasses.replace(
      preset, config=config, base={**base, **small},
      batches=(4, 8), target=1e9, extra_targets=(), seeds=(0,),
      exchange_every=4)


def study(preset_name: str, root: str, four: bool, saturation: float,
          log=print, tiny: bool = False) -> dict:
  preset = PRESETS[preset_name]
  if tiny:
    preset = smoke(preset)
  h = preset.exchange_every
  ladder = {}
  for b in preset.batches:
    wd = run(preset, root, {"data.batch_size": b, "seed": preset.seeds[0]},
             1, log)
    ladder[b] = measure(preset, wd, 1)
    log(f"sync B={b}: steps to {preset.target_key} <= {preset.target}: "
        f"{ladder[b]['steps_to_target']}; B_simple (median) "
        f"{np.median(ladder[b]['b_simple']) if ladder[b]['b_simple'] else '-'}")
  if preset.target is None:
    target = max(min(r["curve"].values()) for r in ladder.values()) + 1e-6
    preset = dataclasses.replace(preset, target=float(target))
    for b, r in ladder.items():
      r["steps_to_target"] = steps_to(r["curve"], preset.target)
    log(f"target: {preset.target_key} <= {preset.target:.4f}")
  at_targets = {}
  for t in (preset.target,) + tuple(preset.extra_targets):
    at_targets[t] = {b: steps_to(r["curve"], t) for b, r in ladder.items()}
  # The smallest B whose doubling buys < `saturation` in steps.
  gains = {}
  for b, b2 in zip(preset.batches, preset.batches[1:]):
    s, s2 = ladder[b]["steps_to_target"], ladder[b2]["steps_to_target"]
    gains[b] = s / s2 if s and s2 else None
  saturated = next((b for b, gain in gains.items()
                    if gain is not None and gain < saturation), None)
  chosen = saturated or preset.batches[-2]
  log(f"doubling gains {gains}; saturated at B={saturated} "
      f"(studying B={chosen})")

  methods = _methods(chosen, h, four)
  results = {m: [] for m in methods}
  param_bytes = None
  for seed in preset.seeds:
    for m, (overrides, groups) in methods.items():
      wd = run(preset, root, {**overrides, "seed": seed}, groups, log)
      param_bytes = param_bytes or _param_bytes(wd)
      r = measure(preset, wd, groups)
      results[m].append({**r, "seed": seed, "workdir": wd})
      log(f"seed {seed} {m}: steps to target {r['steps_to_target']}, final "
          f"{preset.target_key} {r['final']:.4f}")

  summary = {}
  for m, rs in results.items():
    steps = [r["steps_to_target"] for r in rs]
    reached = [s for s in steps if s is not None]
    overrides, groups = methods[m]
    per_step = overrides["data.batch_size"] * groups
    summary[m] = {
        "steps_to_target": steps,
        "steps_mean": float(np.mean(reached)) if reached else None,
        "steps_std": float(np.std(reached)) if len(reached) > 1 else 0.0,
        "examples_to_target": float(np.mean(reached)) * per_step
        if reached else None,
        "examples_per_step": per_step,
        "final": [r["final"] for r in rs],
        "comm_bytes_per_step": comm_bytes_per_step(
            m, groups, overrides["data.batch_size"] // chosen, param_bytes,
            h),
    }
  out = {"preset": preset_name, "preset_fields": dataclasses.asdict(preset),
         "ladder": {b: {k: v for k, v in r.items() if k != "curve"}
                    for b, r in ladder.items()},
         "doubling_gains": gains, "saturated_batch": saturated,
         "ladder_steps_at_targets": {str(t): v for t, v in
                                     at_targets.items()},
         "batch": chosen, "exchange_every": h, "param_bytes": param_bytes,
         "summary": summary,
         "curves": {m: [r["curve"] for r in rs] for m, rs in results.items()},
         "ladder_curves": {b: r["curve"] for b, r in ladder.items()}}
  return out


def verdicts(out: dict) -> list[str]:
  """One line per method against sync 2B and sync B, with the figures."""
  s = out["summary"]
  sync_b, sync_2b = s["sync B"]["steps_mean"], s["sync 2B"]["steps_mean"]
  lines = []
  for m, r in s.items():
    if m.startswith("sync"):
      continue
    mine = r["steps_mean"]
    if mine is None:
      lines.append(f"{m}: never reached the target (final "
                   f"{', '.join(_f(v, 4) for v in r['final'])})")
      continue
    vs = lambda ref: f"{mine / ref:.2f}x" if ref else "n/a"
    beats = ("n/a" if not sync_2b else "yes" if
             mine + r["steps_std"] < sync_2b - s["sync 2B"]["steps_std"]
             else "no" if mine > sync_2b else "within the seed spread")
    lines.append(f"{m}: {mine:.0f} steps to target = {vs(sync_b)} sync B, "
                 f"{vs(sync_2b)} sync 2B; beats sync 2B: {beats}")
  return lines


def plot(out: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  ladder = {int(b): r for b, r in out["ladder"].items()}  # JSON: str keys.
  bs = sorted(ladder)
  ax1.plot(bs, [ladder[b]["steps_to_target"] for b in bs], "o-",
           label="sync (ladder, seed 0)")
  by_kind = {}
  for m, r in out["summary"].items():
    kind = re.sub(r" \d?x?B\b", "", m)
    if r["steps_mean"] is not None:
      by_kind.setdefault(kind, []).append((r["examples_per_step"],
                                           r["steps_mean"], r["steps_std"]))
  for kind, pts in by_kind.items():
    pts.sort()
    ax1.errorbar([p[0] for p in pts], [p[1] for p in pts],
                 [p[2] for p in pts], marker="s", capsize=3, label=kind)
  ax1.set_xscale("log", base=2)
  ax1.set_xlabel("examples per step (all workers)")
  ax1.set_ylabel("steps to target")
  ax1.set_title(f"steps to {out['preset_fields']['target_key']} <= "
                f"{out['preset_fields']['target']}")
  ax1.legend()
  for m, curves in out["curves"].items():
    c = curves[0]
    steps = sorted(int(k) for k in c)
    ax2.plot(steps, [c[k] if k in c else c[str(k)] for k in steps], label=m)
  ax2.axhline(out["preset_fields"]["target"], color="k", ls=":", lw=1)
  ax2.set_xlabel("step")
  ax2.set_ylabel(out["preset_fields"]["target_key"])
  ax2.set_title(f"seed {out['preset_fields']['seeds'][0]}, B = {out['batch']}")
  ax2.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def section(out: dict, plot_rel: str) -> str:
  """The REPORT.md section (markdown) of a study's results."""
  p = out["preset_fields"]
  lines = [
      f"<!-- regime_study:{out['preset']} -->",
      f"## The claim past the critical batch: {out['preset']} "
      "(sync, codistillation, averaging)", "",
      f"`python experiments/regime_study.py --preset={out['preset']}` "
      f"(`{p['config']}`, overrides {p['base']}). Target: "
      f"{p['target_key']} <= {p['target']}; exchange/averaging every "
      f"{out['exchange_every']} steps; seeds {list(p['seeds'])}.", "",
      "Sync ladder (one group, seed 0): steps to target, and the gradient "
      "noise scale B_simple logged by the trainer (median over the run; "
      "rows of a batch):", "",
      "| B | steps to target | B_simple median | S(B)/S(2B) measured |",
      "| --- | --- | --- | --- |"]
  gains = {int(k): v for k, v in out["doubling_gains"].items()}
  for b, r in sorted(out["ladder"].items(), key=lambda kv: int(kv[0])):
    bs = r["b_simple"]
    med = f"{np.median(bs):.0f}" if bs else "-"
    g = gains.get(int(b))
    lines.append(f"| {b} | {_f(r['steps_to_target'])} | {med} | "
                 f"{_f(g, 2)} |")
  lines += ["", "Steps to other targets along the ladder (doubling gain in "
            "brackets):", "", "| target | " + " | ".join(
                str(b) for b in sorted(map(int, out["ladder"]))) + " |",
            "| --- |" + " --- |" * len(out["ladder"])]
  for t, by_b in out["ladder_steps_at_targets"].items():
    bs = sorted(by_b, key=int)
    cells = []
    for i, b in enumerate(bs):
      s_b = by_b[b]
      prev = by_b[bs[i - 1]] if i else None
      gain = f" ({prev / s_b:.2f}x)" if prev and s_b else ""
      cells.append(_f(s_b) + gain)
    lines.append(f"| {t} | " + " | ".join(cells) + " |")
  lines += ["", f"Saturated batch (doubling buys < 1.15x): "
            f"{out['saturated_batch']}; studied at B = {out['batch']}.", "",
            "| method | examples/step | steps to target (per seed) | mean ± "
            "std | examples to target | final (per seed) | bytes/worker/step |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
  for m, r in out["summary"].items():
    lines.append(
        f"| {m} | {r['examples_per_step']} | "
        f"{', '.join(_f(s) for s in r['steps_to_target'])} | "
        f"{_f(r['steps_mean'])} ± {_f(r['steps_std'])} | "
        f"{_f(r['examples_to_target'])} | "
        f"{', '.join(_f(v, 4) for v in r['final'])} | "
        f"{_bytes(r['comm_bytes_per_step'])} |")
  lines += ["", f"![{plot_rel}]({plot_rel})", "", "Verdicts:", ""]
  lines += [f"- {v}" for v in verdicts(out)]
  # The interpretation, written by hand beside the plots (kept on rerun).
  notes = os.path.join(HERE, "report", f"regime_notes_{out['preset']}.md")
  if os.path.exists(notes):
    lines += ["", open(notes).read().strip()]
  lines += ["", f"<!-- /regime_study:{out['preset']} -->"]
  return "\n".join(lines)


def _f(x, digits=0) -> str:
  if x is None:
    return "never"
  return f"{x:.{digits}f}"


def _bytes(x: float) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if x < 1024:
      return f"{x:.0f} {unit}"
    x /= 1024
  return f"{x:.0f} TB"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="fashion", choices=sorted(PRESETS))
  ap.add_argument("--root", default="/tmp/regime_study")
  ap.add_argument("--four", action="store_true", help="also 4 x B")
  ap.add_argument("--saturation", type=float, default=1.15)
  ap.add_argument("--set", action="append", default=[], metavar="K=V",
                  help="a config override of every run (e.g. data.path=...)")
  ap.add_argument("--smoke", action="store_true",
                  help="the preset at toy size (tests; seconds on a CPU)")
  ap.add_argument("--results", default=os.path.join(HERE, "results"))
  ap.add_argument("--report", default=os.path.join(HERE, "REPORT.md"),
                  help="REPORT.md to put the section in ('' : none)")
  args = ap.parse_args()
  # Runs are reused only under the same preset fields (a changed base gets
  # a fresh folder).
  preset = PRESETS[args.preset]
  extra = dict(kv.split("=", 1) for kv in args.set)
  if extra:
    preset = dataclasses.replace(preset, base={**preset.base, **extra})
    PRESETS[args.preset] = preset
  if args.smoke:
    preset = smoke(preset)
  fields = json.dumps(dataclasses.asdict(preset), sort_keys=True,
                      default=str)
  root = os.path.join(args.root, args.preset + "_" + hashlib.sha1(
      fields.encode()).hexdigest()[:8])
  os.makedirs(root, exist_ok=True)
  log_path = os.path.join(root, "study.log")

  def log(msg):
    print(msg, flush=True)
    with open(log_path, "a") as f:
      f.write(msg + "\n")

  out = study(args.preset, root, args.four, args.saturation, log,
              tiny=args.smoke)
  os.makedirs(args.results, exist_ok=True)
  path = os.path.join(args.results, f"regime_study_{args.preset}.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  plot_dir = os.path.join(os.path.dirname(args.report or path), "report")
  os.makedirs(plot_dir, exist_ok=True)
  png = os.path.join(plot_dir, f"regime_{args.preset}.png")
  plot(out, png)
  if args.report:
    bench_lib.put_section(args.report, section(
        out, f"report/regime_{args.preset}.png"),
                          f"regime_study:{args.preset}")
  for v in verdicts(out):
    log(v)
  log(f"wrote {path}")


if __name__ == "__main__":
  main()

r"""Reproduces the papers' claims on this machine: sweeps, plots, REPORT.md.

One command runs every study's sweep points (skipping finished ones), reads
their metrics, renders the plots and writes the report:

  python experiments/repro.py --all            # ~1-2 h on 2 shared CPU cores
  python experiments/repro.py --quick --root=/tmp/rq --out=/tmp/rq/report
  python experiments/repro.py --report_only    # re-render from finished runs

Studies (each a named `sweep()` of a config in configs/; every point is a
plain `python -m codistill_jax.main --config=... --config.a.b=v` command,
printed in the report and in each run's repro_done.json):

  churn        configs/flights.py sweep('churn'): claim 2 (reproducibility)
  speed        configs/kernel_lm.py sweep('speed'): claim 1 (LM speed)
  wd           configs/fashion_mnist.py sweep('wd'): claim 3 (weight decay)
  wd_long      configs/fashion_mnist.py sweep('wd_long'): claim 3, 4x longer
  sensitivity  configs/flights.py sweep('sensitivity'): claim 4

Resuming: a point whose run exited 0 has WORKDIR/repro_done.json and is
skipped; an interrupted point is started again with the same command and the
trainer resumes from its own checkpoints. A partial sweep still yields a report
of what finished.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time

import repro_report  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Study:
  config: str  # Relative to the repository root.
  sweep: str  # Name passed to the config's sweep().


STUDIES = {
    "churn": Study("configs/flights.py", "churn"),
    "wd": Study("configs/fashion_mnist.py", "wd"),
    "wd_long": Study("configs/fashion_mnist.py", "wd_long"),
    "speed": Study("configs/kernel_lm.py", "speed"),
    "sensitivity": Study("configs/flights.py", "sensitivity"),
}


@dataclasses.dataclass(frozen=True)
class Point:
  study: str
  config: str  # 'configs/x.py' or 'configs/x.py:quick'.
  overrides: dict
  workdir: str

  @property
  def num_groups(self) -> int:
    return int(self.overrides.get("codistill.num_groups", 1))

  def command(self) -> list[str]:
    return ([sys.executable, "-m", "codistill_jax.main",
             f"--config={self.config}", f"--workdir={self.workdir}"]
            + [f"--config.{k}={_flag_value(v)}"
               for k, v in self.overrides.items()])

  def env(self) -> dict:
    # All groups in one process, one (fake CPU) device each; an inherited
    # device count (pytest's 8) would change a 1-group run's data sharding.
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if self.num_groups > 1:
      flags.append("--xla_force_host_platform_device_count="
                   f"{self.num_groups}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env

  def shell(self) -> str:
    """The command as one could paste it (python, not the absolute path)."""
    env = (f"XLA_FLAGS=--xla_force_host_platform_device_count="
           f"{self.num_groups} " if self.num_groups > 1 else "")
    return env + " ".join(["python"] + self.command()[1:])

  @property
  def done(self) -> bool:
    return os.path.exists(os.path.join(self.workdir, "repro_done.json"))


def _flag_value(v) -> str:
  return repr(v) if isinstance(v, float) else str(v)


def _load_config_module(path: str):
  from codistill_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_module(os.path.join(REPO, path))


def points(study_name: str, root: str, quick: bool) -> list[Point]:
  """The study's sweep points, each with its own workdir under `root`."""
  study = STUDIES[study_name]
  raw = _load_config_module(study.config).sweep(study.sweep, quick=quick)
  config = study.config + (":quick" if quick else "")
  # The workdir names what varies inside the study; the hash keeps two
  # points that differ only in a shared key apart.
  varying = sorted({k for p in raw for k in p
                    if len({json.dumps(q.get(k)) for q in raw}) > 1})
  out = []
  for p in raw:
    name = "_".join(f"{k.split('.')[-1]}={p[k]}" for k in varying
                    if k in p and k != "codistill.exchange_blocking")
    digest = hashlib.sha1(json.dumps([config, p], sort_keys=True).encode())
    out.append(Point(study_name, config, p, os.path.join(
        root, study_name, f"{name}_{digest.hexdigest()[:6]}")))
  return out


# ----------------------------------------------------------------------------
# Running points: a small process pool, resumable.
# ----------------------------------------------------------------------------
def run_points(todo: list[Point], jobs: int, nice: int) -> list[Point]:
  """Runs the unfinished points, `jobs` at a time; returns those that failed."""
  todo = [p for p in todo if not p.done]
  running: list[tuple[Point, subprocess.Popen, float, object]] = []
  failed = []
  total = len(todo)
  while todo or running:
    while todo and len(running) < jobs:
      p = todo.pop(0)
      os.makedirs(p.workdir, exist_ok=True)
      log = open(os.path.join(p.workdir, "repro.log"), "a")
      cmd = (["nice", "-n", str(nice)] if nice else []) + p.command()
      print(f"[repro] start ({total - len(todo)}/{total}) {p.shell()}",
            flush=True)
      running.append((p, subprocess.Popen(
          cmd, cwd=REPO, env=p.env(), stdout=log, stderr=subprocess.STDOUT),
                      time.time(), log))
    time.sleep(1)
    for item in list(running):
      p, proc, start, log = item
      if proc.poll() is None:
        continue
      running.remove(item)
      log.close()
      wall = time.time() - start
      if proc.returncode == 0:
        with open(os.path.join(p.workdir, "repro_done.json"), "w") as f:
          json.dump({"command": p.shell(), "overrides": p.overrides,
                     "wall_s": wall}, f, indent=1)
        print(f"[repro] done in {wall:.0f}s {p.workdir}", flush=True)
      else:
        failed.append(p)
        print(f"[repro] FAILED rc={proc.returncode} {p.workdir} (see "
              "repro.log there)", flush=True)
  return failed


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--all", action="store_true",
                      help="Run every study, then write the report.")
  parser.add_argument("--quick", action="store_true",
                      help="Tiny `:quick` points (CI smoke test).")
  parser.add_argument("--studies", default=",".join(STUDIES),
                      help="Comma-separated studies to run, in this order.")
  parser.add_argument("--breadth", action="store_true",
                      help="Run every study's seed 0 first, then seed 1, ...: "
                      "a partial sweep then covers every point once.")
  parser.add_argument("--report_only", action="store_true",
                      help="Run nothing; report what has finished.")
  parser.add_argument("--root", default="/tmp/codistill_repro",
                      help="Workdirs of the runs (keep it to resume).")
  parser.add_argument("--out", default=os.path.join(REPO, "experiments"),
                      help="REPORT.md goes here, plots under OUT/report/.")
  parser.add_argument("--jobs", type=int, default=1,
                      help="Training processes at once (2-core box: 1).")
  parser.add_argument("--nice", type=int, default=0,
                      help="nice level of the training processes.")
  args = parser.parse_args(argv)
  names = list(STUDIES) if args.all else [
      s for s in args.studies.split(",") if s]
  for s in names:
    if s not in STUDIES:
      parser.error(f"--studies: unknown study {s!r}; one of {list(STUDIES)}")
  by_study = {s: points(s, args.root, args.quick) for s in STUDIES}
  todo = [p for s in names for p in by_study[s]]
  if args.breadth:  # Stable: within a seed, the studies' order is kept.
    todo.sort(key=lambda p: p.overrides.get("seed", 0))
  failed = []
  if not args.report_only:
    failed = run_points(todo, args.jobs, args.nice)
  report = repro_report.write_report(by_study, args.out, quick=args.quick,
                                     repo=REPO)
  print(f"[repro] wrote {report}")
  if failed:
    print(f"[repro] {len(failed)} point(s) failed: "
          + ", ".join(p.workdir for p in failed))
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""End-to-end smoke test of the reproduction runner (experiments/repro.py).

Runs `--quick` (every study's tiny `:quick` sweep points as real training
processes) in a temporary directory and checks the report's structure: one
section per claim, the summary table, filled-in result tables, and PNG plots
that exist and decode as images. Then checks that a second invocation skips
finished points (resume) and that an interrupted point is rerun.
"""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import repro  # pylint: disable=g-import-not-at-top,wrong-import-position
import repro_report  # pylint: disable=g-import-not-at-top,wrong-import-position

CLAIM_SECTIONS = (
    "## Summary", "## Scale", "## Claim 1: LM speed",
    "## Claim 2: churn on CTR", "## Claim 3: sync 2B vs codistilled",
    "## Claim 4: sensitivity", "## Importance-sampled distillation (issue 4)",
    "## Teacher service throughput")
PLOTS = ("churn_bars.png", "churn_loss.png", "speed_loss.png",
         "speed_batch_curve.png", "wd_accuracy.png", "wd_loss.png",
         "sensitivity.png")


def _run_quick(root, out, *extra):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "repro.py"),
       "--quick", f"--root={root}", f"--out={out}", "--jobs=2", *extra],
      cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
      # The checkout's package, installed or not (a script's sys.path
      # starts at experiments/).
      env={**os.environ, "PYTHONPATH": os.pathsep.join(
          filter(None, [REPO, os.environ.get("PYTHONPATH")]))})


def _table_rows(section: str) -> list[list[str]]:
  """Data rows (not header or rule) of the first Markdown table in `section`."""
  lines = section.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("|"))
  end = next((i for i in range(start, len(lines))
              if not lines[i].startswith("|")), len(lines))
  return [[c.strip() for c in l.strip("|").split("|")]
          for l in lines[start + 2:end]]


DATASETS = {"/usr/share/datasets/fashion-mnist":
            "apt-get install -y dataset-fashion-mnist",
            "/usr/share/doc/linux-doc-6.1/html/_sources":
            "apt-get install -y linux-doc-6.1"}


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
  # The quick points train on the real datasets (as the report does).
  for path, install in DATASETS.items():
    if not os.path.isdir(path):
      pytest.skip(f"{path} missing: {install}")
  root, out = tmp_path / "runs", tmp_path / "out"
  result = _run_quick(root, out)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

  report = (out / "REPORT.md").read_text()
  positions = [report.find(s) for s in CLAIM_SECTIONS]
  assert all(p >= 0 for p in positions), [
      s for s, p in zip(CLAIM_SECTIONS, positions) if p < 0]
  assert positions == sorted(positions)  # In reading order.
  sections = dict(zip(CLAIM_SECTIONS, re.split(
      "|".join(re.escape(s) for s in CLAIM_SECTIONS), report)[1:]))

  # The summary names all four claims, each with its command.
  summary = _table_rows(sections["## Summary"])
  assert [r[0][:2] for r in summary] == ["1.", "2.", "3.", "4."]
  assert all("experiments/repro.py" in r[-1] for r in summary)
  # Every quick point finished, so no claim is left unmeasured.
  assert not any("not yet measured" in r[2] for r in summary[:3]), summary

  # Churn: three methods, each with a measured churn over its seed pair.
  churn = _table_rows(sections["## Claim 2: churn on CTR"])
  assert [r[0] for r in churn] == list(repro_report.METHODS)
  assert [r[1] for r in churn[3:]] == ["-"] * 3  # Not in the quick sweep.
  for row in churn[:3]:
    assert row[1] == "0,1"
    assert re.match(r"\d\.\d{4} \(n=1\)", row[4]), row  # 1 pair of 2 seeds.
  assert churn[0][5] == "1.00"
  # LM speed: one codistilled batch size with its ratio.
  speed = _table_rows(sections["## Claim 1: LM speed"])
  assert [r[0] for r in speed] == ["8"]
  assert re.match(r"\d+\.\d\d \(n=1\)", speed[0][6]), speed
  # Image: both methods; sensitivity: the exchange-every-step point.
  wd = _table_rows(sections["## Claim 3: sync 2B vs codistilled"])
  assert sorted(r[0] for r in wd) == ["codistill", "sync"]
  sens = _table_rows(sections["## Claim 4: sensitivity"])
  assert ["exchange_every", "1"] == sens[0][:2]
  # Each study states the commands that reproduce it.
  assert report.count("python -m codistill_jax.main --config=configs/") >= 4

  for name in PLOTS:
    assert f"](report/{name})" in report, name
    data = (out / "report" / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(
        data[20:24], "big")
    assert width > 100 and height > 100, (name, width, height)
    assert len(data) < 200_000, (name, len(data))
  assert json.loads((out / "report" / "summary.json").read_text())["churn"]

  # Resume: nothing left to run, so a second call starts no training; an
  # interrupted point (no repro_done.json) is started again.
  points = repro.points("sensitivity", str(root), quick=True)
  os.remove(os.path.join(points[0].workdir, "repro_done.json"))
  again = _run_quick(root, out, "--studies=churn,sensitivity")
  assert again.returncode == 0, again.stderr[-3000:]
  started = [l for l in again.stdout.splitlines() if "[repro] start" in l]
  assert len(started) == 1 and points[0].workdir in started[0], again.stdout


def test_steps_to_interpolates_and_reports_never():
  curve = {50: 4.0, 100: 3.0, 150: 2.5}
  assert repro_report.steps_to(curve, 3.5) == 75.0
  assert repro_report.steps_to(curve, 4.5) == 50.0
  assert repro_report.steps_to(curve, 2.5) == 150.0
  assert repro_report.steps_to(curve, 2.0) is None


def test_points_are_plain_flags_with_own_workdirs(tmp_path):
  for study in repro.STUDIES:
    pts = repro.points(study, str(tmp_path), quick=False)
    assert len({p.workdir for p in pts}) == len(pts), study
    for p in pts:
      flags = p.command()[3:]  # After python -m codistill_jax.main.
      assert flags[0].startswith("--config=configs/")
      assert all(f.startswith("--config.") for f in flags[2:]), flags
      assert (p.num_groups > 1) == ("XLA_FLAGS" in p.shell())


def test_missing_companion_results_say_not_yet_measured(tmp_path):
  text = repro_report.sampled_section(str(tmp_path))
  assert text.count("not yet measured") == 2
  (tmp_path / "bench_sampled.json").write_text(json.dumps({
      "device": "cpu", "cpu_count": 2, "results": [{
          "vocab": 32768, "num_samples": 1024, "positions": 512, "dim": 128,
          "full_ms": 10.0, "sampled_ms": 2.5, "full_temp_mib": 64.0,
          "sampled_temp_mib": 4.0, "speedup": 4.0, "memory_ratio": 16.0}]}))
  text = repro_report.sampled_section(str(tmp_path))
  assert text.count("not yet measured") == 1
  assert "| 32768 | 1024 | 512 | 128 | 10.000 | 2.500 | 4.000 |" in text
  assert "not yet measured" in repro_report.service_section(str(tmp_path))

"""Helpers shared by the benchmark scripts (no flags, no side effects)."""

import os
import re
import time

import jax
import numpy as np

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                       "configs")


def load_config(name: str, arg: str | None):
  """configs/<name>.py's get_config(arg), unlocked for the benchmark."""
  from codistill_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load(os.path.join(CONFIGS, name + ".py") +
                         (f":{arg}" if arg else ""), lock=False)


def median_time(fn, n: int) -> float:
  """Median wall time of `fn()` (blocked until its result is ready)."""
  times = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def write_json(path: str, results) -> None:
  """Writes a benchmark's numbers (docs/benchmarks.md points at these files)."""
  import json  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {path}")


def put_section(report: str, text: str, key: str) -> None:
  """Replaces the section of REPORT.md marked `<!-- key -->...<!-- /key -->`
  (`text` carries the markers) or appends it."""
  old = open(report).read() if os.path.exists(report) else ""
  pattern = re.compile(rf"<!-- {re.escape(key)} -->.*?"
                       rf"<!-- /{re.escape(key)} -->", re.S)
  new = (pattern.sub(lambda _: text, old) if pattern.search(old)
         else old.rstrip("\n") + "\n\n" + text + "\n")
  with open(report, "w") as f:
    f.write(new)

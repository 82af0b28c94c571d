r"""Start-up: how long a `:quick` run takes to its first step, cold and warm.

Each config runs `python -m codistill_jax.main --config=configs/X.py:quick`
twice with a fresh HOME (so JAX's persistent compilation cache and the data
caches under ~/.cache/codistill_jax start empty): the first run is cold, the
second warm. Reported: the trainer's own "first step done N s after start-up
began" (from the package's import) and the whole process's wall time.

  python experiments/bench_startup.py [--configs=flights,fashion_mnist,kernel_lm] \
      [--out=experiments/results/bench_startup.json]
"""

import os
import re
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_CONFIGS = flags.DEFINE_list("configs", ["flights", "fashion_mnist",
                                         "kernel_lm"], "Configs (:quick).")
_OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        "bench_startup.json"), "Where the numbers go.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one(config: str, home: str) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    env = {**os.environ, "HOME": home, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "codistill_jax.main",
         f"--config=configs/{config}.py:quick", f"--workdir={workdir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
  first = float(re.search(r"first step done ([\d.]+) s", out.stderr).group(1))
  return {"first_step_s": first, "process_s": wall}


def main(argv):
  del argv
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_lib  # pylint: disable=g-import-not-at-top
  rows = []
  for config in _CONFIGS.value:
    with tempfile.TemporaryDirectory() as home:
      cold, warm = one(config, home), one(config, home)
    rows.append({"config": f"{config}:quick", "cold": cold, "warm": warm})
    print(f"{config}:quick  first step {cold['first_step_s']:.1f} s cold, "
          f"{warm['first_step_s']:.1f} s warm; whole run "
          f"{cold['process_s']:.1f} s cold, {warm['process_s']:.1f} s warm",
          flush=True)
  bench_lib.write_json(_OUT.value, {"rows": rows})


if __name__ == "__main__":
  app.run(main)

r"""LM codistillation with sampled vs full-softmax distillation: final quality.

Runs the kernel-docs LM as 2-way codistillation (one process, one CPU device
per group) twice with everything equal but `codistill.sampled.num_samples`
(0 = full softmax, else K), and compares the groups' final validation and
test perplexity (always computed with the exact full softmax) and the
training wall time.

  python experiments/sampled_quality.py [--steps=1000] [--num_samples=1024] \
      [--vocab_size=8192] [--workdir=/tmp/sampled_quality]

Needs `apt-get install -y linux-doc-6.1`. Writes
experiments/results/sampled_quality.json.
"""

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

_STEPS = flags.DEFINE_integer("steps", 1000, "Updates per group.")
_K = flags.DEFINE_integer("num_samples", 1024, "K of the sampled run.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "Word vocabulary size.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "config.seed values.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/sampled_quality",
                               "Parent of the runs' workdirs.")
_OUT = flags.DEFINE_string("out", "experiments/results/sampled_quality.json",
                           "Output JSON.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(name: str, seed: str, k: int) -> dict:
  workdir = os.path.join(_WORKDIR.value, f"{name}_seed{seed}")
  cmd = [sys.executable, "-m", "codistill_jax.main",
         "--config=configs/kernel_lm.py:groups=2", f"--workdir={workdir}",
         f"--config.total_steps={_STEPS.value}", f"--config.seed={seed}",
         f"--config.data.vocab_size={_VOCAB.value}",
         f"--config.eval_every={_STEPS.value}",
         f"--config.codistill.sampled.num_samples={k}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  print(" ".join(cmd[1:]), flush=True)
  t = time.time()
  subprocess.run(cmd, cwd=ROOT, env=env, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wall = time.time() - t
  out = {"command": " ".join(cmd[1:]), "wall_s": wall}
  for g in (0, 1):
    with open(os.path.join(workdir, f"group_{g}", "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    last = [r for r in rows if "validation/perplexity" in r][-1]
    out[f"group_{g}"] = {k: last[k] for k in last
                         if k.endswith("perplexity") or k == "step"}
  return out


def main(argv):
  del argv
  results = {"steps": _STEPS.value, "num_samples": _K.value,
             "vocab_size": _VOCAB.value, "runs": {}}
  for seed in _SEEDS.value:
    for name, k in (("full", 0), ("sampled", _K.value)):
      results["runs"][f"{name}_seed{seed}"] = run(name, seed, k)
      print(json.dumps(results["runs"][f"{name}_seed{seed}"]), flush=True)
  for seed in _SEEDS.value:
    full = results["runs"][f"full_seed{seed}"]
    samp = results["runs"][f"sampled_seed{seed}"]
    for g in (0, 1):
      for split in ("validation", "test"):
        a = samp[f"group_{g}"][f"{split}/perplexity"]
        b = full[f"group_{g}"][f"{split}/perplexity"]
        print(f"seed {seed} group {g} {split} perplexity: sampled {a:.2f} "
              f"full {b:.2f} ratio {a / b:.4f}")
    print(f"seed {seed} wall: sampled/full = "
          f"{samp['wall_s'] / full['wall_s']:.3f}")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_lib  # pylint: disable=g-import-not-at-top
  bench_lib.write_json(os.path.join(ROOT, _OUT.value), results)


if __name__ == "__main__":
  app.run(main)

r"""What the exchange costs the trainer: the same run with it on and off.

Each workload trains 2 groups in one process on 2 CPU devices
(`python -m codistill_jax.main`, one sub-mesh each) with the background
exchange every `--every` steps, and again with `exchange_every=100000`: the
same step with the same teacher forward (on zero params) and no exchange.
Runs alternate on and off for `--rounds` (the machine's load drifts), and
the benchmark reports per workload the median over rounds of

  * steady steps/s on / off (the log windows after the first two, whose
    compilation and warm-up differ),
  * process CPU-seconds on - off, and per exchange,
  * the exchange's own logged cost: CPU ms per publish and per restore (the
    exchange's threads) and the MB each moves,

for each `--formats` of the 'on' runs: `blob` (the default) and `orbax` (the
format every publish used before; kept for groups spanning processes), so
one run gives the cost before and after side by side. For `mlp` each round
also runs experiments/torch_peer_loop.py (2 threads) when torch is installed
(`pip install -e .[torch]`) and reports trainer / PyTorch peer loop.

  python experiments/bench_exchange.py [--workloads=mlp,image,lm] \
      [--rounds=3] [--out=experiments/results/bench_exchange.json]

Workloads: `mlp` (784-512-512-10, experiments/bench_models/mlp.py, on
Fashion-MNIST, batch 128 per group: experiments/bench_models/fashion_mlp.py), `image` (configs/fashion_mnist.py's
CNN), `lm` (configs/kernel_lm.py). Needs the Debian datasets of DATA.md.
"""

import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

_WORKLOADS = flags.DEFINE_list("workloads", ["mlp", "image", "lm"],
                               "Which workloads.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "On/off pairs per workload.")
_EVERY = flags.DEFINE_integer("every", 50, "exchange_every when on.")
_TORCH = flags.DEFINE_bool(
    "torch", True, "For the mlp workload, also run experiments/"
    "torch_peer_loop.py (2 threads) each round, when torch is installed.")
_FORMATS = flags.DEFINE_list(
    "formats", ["blob", "orbax"], "codistill.exchange_format of the 'on' "
    "runs: 'blob' is the default since issue 18, 'orbax' what came before.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        "bench_exchange.json"), "Where the numbers go.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = {
    "mlp": ("experiments/bench_models/fashion_mlp.py", 1000, []),
    "image": ("configs/fashion_mnist.py", 600, ["--config.data.batch_size=128"]),
    "lm": ("configs/kernel_lm.py", 400, []),
}


def one_run(workload: str, exchange_every: int, fmt: str = "auto") -> dict:
  config, steps, extra = WORKLOADS[workload]
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, "-m", "codistill_jax.main", f"--config={config}",
           f"--workdir={workdir}", "--config.codistill.num_groups=2",
           f"--config.total_steps={steps}", "--config.log_every=50",
           f"--config.eval_every={steps}", f"--config.checkpoint_every={steps}",
           "--config.eval_max_batches=1", "--config.codistill.burn_in_steps=0",
           f"--config.codistill.exchange_every={exchange_every}",
           f"--config.codistill.exchange_format={fmt}", *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join(
               [ROOT, os.path.join(ROOT, "experiments")])}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True,
                   text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = [json.loads(l) for l in open(os.path.join(
        workdir, "group_0", "metrics.jsonl")) if '"steps_per_sec"' in l]
  last = rows[-1]
  return {"workload": workload, "exchange_every": exchange_every, "format": fmt,
          "steps": steps, "wall_s": wall,
          "cpu_s": (after.ru_utime + after.ru_stime) -
                   (before.ru_utime + before.ru_stime),
          "steps_per_s": float(np.median([r["steps_per_sec"]
                                          for r in rows[2:]])),
          **{k: last[k] for k in last if k.startswith("exchange/")}}


def torch_rate(steps: int) -> float | None:
  """steps/s of the PyTorch peer loop, or None without torch."""
  if importlib.util.find_spec("torch") is None:
    return None
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "torch_peer_loop.py"),
       f"--steps={steps}", "--threads=2", f"--every={_EVERY.value}"],
      cwd=ROOT, check=True, capture_output=True, text=True)
  return float(json.loads(out.stdout.strip().splitlines()[-1])["steps_per_s"])


def _summary(pairs: list[tuple[dict, dict]], exchanges: int) -> dict:
  """Medians over rounds of one format's (on, off) pairs."""
  med = lambda f: float(np.median([f(on, off) for on, off in pairs]))
  return {
      "throughput_on_over_off": med(lambda a, b: a["steps_per_s"] /
                                    b["steps_per_s"]),
      "extra_cpu_s": med(lambda a, b: a["cpu_s"] - b["cpu_s"]),
      "extra_cpu_s_per_exchange": med(
          lambda a, b: (a["cpu_s"] - b["cpu_s"]) / exchanges),
      "publish_cpu_ms": med(lambda a, _: a.get("exchange/publish_cpu_ms", 0)),
      "restore_cpu_ms": med(lambda a, _: a.get("exchange/restore_cpu_ms", 0)),
      "mb_per_publish": med(lambda a, _: a.get("exchange/publish_mb", 0)),
      "exchanges": exchanges}


def main(argv):
  del argv
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_lib  # pylint: disable=g-import-not-at-top
  runs, summary = [], {}
  for workload in _WORKLOADS.value:
    pairs = {fmt: [] for fmt in _FORMATS.value}
    torch_rates = []  # (trainer steps/s, PyTorch loop steps/s) per round.
    for r in range(_ROUNDS.value):
      off = one_run(workload, 100000)
      runs.append({"round": r, **off})
      for fmt in _FORMATS.value:
        on = one_run(workload, _EVERY.value, fmt)
        runs.append({"round": r, **on})
        pairs[fmt].append((on, off))
        print(f"{workload} round {r} {fmt}: on {on['steps_per_s']:.1f} "
              f"steps/s, off {off['steps_per_s']:.1f} -> "
              f"{on['steps_per_s'] / off['steps_per_s']:.3f}x; CPU "
              f"{on['cpu_s']:.1f} vs {off['cpu_s']:.1f} s; publish "
              f"{on.get('exchange/publish_cpu_ms', 0):.1f} ms CPU, restore "
              f"{on.get('exchange/restore_cpu_ms', 0):.1f} ms CPU, "
              f"{on.get('exchange/publish_mb', 0):.2f} MB each", flush=True)
      if workload == "mlp" and _TORCH.value:
        rate = torch_rate(WORKLOADS[workload][1])
        if rate:
          torch_rates.append((pairs[_FORMATS.value[0]][-1][0]["steps_per_s"],
                              rate))
          print(f"mlp round {r}: PyTorch peer loop {rate:.1f} steps/s -> "
                f"trainer ({_FORMATS.value[0]}) / PyTorch "
                f"{torch_rates[-1][0] / rate:.3f}x", flush=True)
    exchanges = 2 * (WORKLOADS[workload][1] // _EVERY.value)  # Both groups.
    for fmt, fmt_pairs in pairs.items():
      s = summary.setdefault(workload, {})[fmt] = _summary(fmt_pairs,
                                                            exchanges)
      print(f"{workload} {fmt}: throughput on/off "
            f"{s['throughput_on_over_off']:.3f}x, "
            f"{1e3 * s['extra_cpu_s_per_exchange']:.0f} ms extra process CPU "
            f"per exchange (publish {s['publish_cpu_ms']:.1f} + restore "
            f"{s['restore_cpu_ms']:.1f} ms on the exchange's threads, "
            f"{s['mb_per_publish']:.2f} MB)", flush=True)
    if torch_rates:
      summary[workload]["trainer_over_torch"] = float(np.median(
          [a / b for a, b in torch_rates]))
      summary[workload]["torch_steps_per_s"] = [b for _, b in torch_rates]
      print(f"mlp: trainer / PyTorch peer loop "
            f"{summary[workload]['trainer_over_torch']:.3f}x", flush=True)
    # After each workload: a run stopped later keeps what it measured.
    bench_lib.write_json(_OUT.value, {"summary": summary, "runs": runs,
                                      "every": _EVERY.value})
  bench_lib.write_json(_OUT.value, {"summary": summary, "runs": runs,
                                    "every": _EVERY.value})


if __name__ == "__main__":
  app.run(main)

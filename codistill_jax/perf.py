"""How fast a step is against what the chip could do: FLOPs, peaks, MFU.

`step_flops` asks XLA for a jitted step's FLOPs (its cost analysis of the
lowered program); `peak_flops` gives a device's peak dense FLOP/s from one
table (the data sheets' bf16 figures for accelerators; measured once and
cached for a CPU); `mfu` divides. The trainer's progress line, compile_check
and the benchmarks all use these, so the figures are comparable.
"""

import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp

# Peak dense bf16 FLOP/s per chip, from the vendors' data sheets:
# cloud.google.com/tpu/docs/{v5e,v5p,v6e}; nvidia.com/en-us/data-center/
# {h100,h200} (the dense figure: half the "with sparsity" one).
PEAK_BF16 = {
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}
# HBM per chip (bytes), for "does it fit" next to compile_check's figures.
HBM_BYTES = {"TPU v5 lite": 16e9, "TPU v5e": 16e9, "TPU v5p": 95 * 2**30,
             "TPU v5": 95 * 2**30, "TPU v6 lite": 32e9, "TPU v6e": 32e9,
             "NVIDIA H100": 80e9, "NVIDIA H200": 141e9, "NVIDIA A100": 80e9}


def _lookup(table: dict, kind: str):
  for name in sorted(table, key=len, reverse=True):  # Longest match first.
    if kind.lower().startswith(name.lower()):
      return table[name]
  return None


def model_flops(model, example_batch: dict[str, Any], teachers: int = 0
                ) -> float:
  """FLOPs of one training step by the model's own count, or 0.

  For a sequence model that gives `flops_per_token(seq_len)` (its forward):
  3x the forward for the student's update (PaLM's MFU convention; a
  rematerialised forward is not counted) plus one forward per stacked
  teacher, over the batch's tokens. XLA's count (`step_flops`) is the
  fallback; it sees a scanned layer loop's body once, so it undercounts
  models with `scan_layers`.
  """
  per_token = getattr(model, "flops_per_token", None)
  labels = example_batch["labels"]
  if per_token is None or getattr(labels, "ndim", 1) != 2:
    return 0.0
  batch, length = labels.shape
  return (3 + teachers) * per_token(length) * batch * length


def hbm_bytes(device) -> float | None:
  """Memory of one accelerator chip (None when the table does not know)."""
  return _lookup(HBM_BYTES, getattr(device, "device_kind", ""))


def step_flops(jitted, *args) -> float:
  """FLOPs of one call of `jitted` on `args` (arrays or ShapeDtypeStructs),
  all devices together; 0 if XLA does not say."""
  try:
    cost = jitted.lower(*args).cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return 0.0  # A backend without cost analysis: no MFU, nothing else.
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def peak_flops(device=None, cache_dir: str | None = None) -> float:
  """Peak dense FLOP/s of one device (a CPU: measured, cached per machine)."""
  device = device or jax.devices()[0]
  peak = _lookup(PEAK_BF16, getattr(device, "device_kind", ""))
  if peak:
    return peak
  if device.platform == "cpu":
    return _cpu_peak(cache_dir or os.path.join(
        os.path.expanduser("~"), ".cache", "codistill_jax"))
  return 0.0


@functools.lru_cache(maxsize=1)
def _cpu_peak(cache_dir: str) -> float:
  """The float32 matmul FLOP/s one CPU device reaches (1024^3, best of 5)."""
  path = os.path.join(cache_dir, f"cpu_peak-{os.cpu_count()}.json")
  try:
    with open(path) as f:
      return float(json.load(f)["flops"])
  except (OSError, ValueError, KeyError):
    pass
  n = 1024
  x = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = min(_timed(matmul, x) for _ in range(5))
  flops = 2 * n**3 / best
  try:
    os.makedirs(cache_dir, exist_ok=True)
    with open(path, "w") as f:
      json.dump({"flops": flops, "n": n}, f)
  except OSError:
    pass
  return flops


def _timed(fn, x) -> float:
  t = time.perf_counter()
  fn(x).block_until_ready()
  return time.perf_counter() - t


def mfu(flops_per_step: float, steps_per_s: float, devices: int,
        peak_per_device: float) -> float:
  """Model FLOPs utilisation: achieved FLOP/s over the devices' peak."""
  if not (flops_per_step and peak_per_device and devices):
    return 0.0
  return flops_per_step * steps_per_s / (devices * peak_per_device)


@dataclasses.dataclass(frozen=True)
class Speed:
  """What a group's steps/s means: units per step, FLOPs, the devices' peak."""
  unit: str = "examples"  # Or 'tokens'.
  per_step: int = 0  # Units one step consumes (the global batch).
  flops: float = 0.0  # Per step, all devices (0: unknown).
  devices: int = 1
  peak: float = 0.0  # Per device (0: unknown).

  def scalars(self, steps_per_s: float) -> dict[str, float]:
    out = {"steps_per_sec": steps_per_s,
           f"{self.unit}_per_sec": steps_per_s * self.per_step,
           "devices": self.devices}
    if self.flops and self.peak:
      out["mfu"] = mfu(self.flops, steps_per_s, self.devices, self.peak)
    return out

  def describe(self, steps_per_s: float) -> str:
    """'1.2k examples/s per group  MFU 3.1%' (no MFU when unknown)."""
    u = mfu(self.flops, steps_per_s, self.devices, self.peak)
    return (f"{si(steps_per_s * self.per_step)} {self.unit}/s per group" +
            (f"  MFU {100 * u:.3g}%" if u else ""))


def si(x: float) -> str:
  """12345.6 -> '12.3k' (rates in progress lines and reports)."""
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.0f}"


def describe(example_batch: dict[str, Any]) -> tuple[str, int]:
  """('tokens', per batch) for sequence labels, else ('examples', per batch)."""
  labels = example_batch["labels"]
  if getattr(labels, "ndim", 1) > 1:
    return "tokens", int(labels.size)
  return "examples", int(labels.shape[0])


class Trace:
  """A `jax.profiler` trace of the loop's steps a..b-1 (steps None: none).

  `at(step)` before each step; leaving the `with` block ends a trace the
  loop did not reach the end of (the run finished or stopped inside it).
  """

  def __init__(self, steps: tuple[int, int] | None, path: str):
    self.steps, self.path, self.on = steps, path, False

  def at(self, step: int) -> None:
    if self.steps and step == self.steps[0]:
      jax.profiler.start_trace(self.path)
      self.on = True
    elif self.on and step == self.steps[1]:
      self.__exit__()

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    if self.on:  # Also when the run ends or stops inside the window.
      jax.profiler.stop_trace()
      self.on = False
      logging.info("profile of steps %d..%d in %s (tensorboard --logdir %s)",
                   *self.steps, self.path, self.path)


@contextlib.contextmanager
def prompt_threads(interval_s: float = 2e-4):
  """Python's thread switch interval lowered to `interval_s` inside.

  The loop's thread waits for the GIL whenever a helper thread (the input
  prefetch, the exchange) runs Python; CPython makes it wait up to the switch
  interval, 5 ms by default, longer than a small model's whole step. The
  interval is restored on the way out.
  """
  old = sys.getswitchinterval()
  sys.setswitchinterval(min(old, interval_s))
  try:
    yield
  finally:
    sys.setswitchinterval(old)

r"""Ahead-of-time compile check: will a config's train step fit the target?

Lowers and compiles one group's sharded train step -- with the stacked
teacher params of its G-1 peers when it codistils -- for a target device
count, without creating a parameter or running a step, and reports what XLA
says one device needs (arguments, outputs, temporaries, code) and the step's
flops. A pod run that will not fit fails here, in seconds, on a CPU.

  python -m codistill_jax.tools.compile_check --config=configs/kernel_lm.py \
      --num_devices=64 --max_memory_per_device=16GiB [--config.a.b=value]

The state is built exactly as the trainer builds it (`build.build`:
`jax.eval_shape` + the config's sharding rules) and the step is the trainer's
own jitted function (`build.train_step`, with the teacher source's
`layout`), lowered with `ShapeDtypeStruct`s instead of arrays. The data module
is asked for one batch (shapes only matter) and the dataset's sizes
(vocabulary, classes), so the data must be readable where the check runs.

Targets: `--num_devices=N` compiles for N devices of the platform JAX sees
(on a CPU host N fake CPU devices; XLA's CPU memory figures are a proxy
for an accelerator's). `--topology=v5e:4x4` compiles for a TPU slice that is
not attached (`jax.experimental.topologies`, `pip install -e .[tpu]`): the
slice is carved into G sub-slices (`mesh.slice_groups`), the last group's
step is compiled (every group has the same shape; libtpu's compile-only
client refuses some sets that hold chip 0), and the figures are the TPU
compiler's own, with its estimated step time. From it: the implied MFU
against the chip's peak (`perf.PEAK_BF16`), examples or tokens per second
per chip, whether the step fits the chip's HBM, and for codistillation the
bytes a group publishes per exchange and their time at
`--storage_bandwidth`.

  python -m codistill_jax.tools.compile_check --config=configs/lm.py:size=1b \
      --topology=v5p:4x4x8 --config.codistill.num_groups=2

Bad input is checked before anything compiles: the config (for the target's
device count), `--num_devices` (positive; not with `--topology`), the sizes,
and that `--json_out` can be written (a file, replaced if it exists).

Exit codes: 0 fits (or no budget given), 2 bad input (one `error:` line),
3 over `--max_memory_per_device` (one `error:` line naming the figure).
"""

import dataclasses
import json
import os
import re
import time

from absl import flags
import jax
from jax.experimental import topologies

from codistill_jax import build
from codistill_jax import cli
from codistill_jax import config_lib
from codistill_jax import data as data_lib
from codistill_jax import mesh as mesh_lib
from codistill_jax import perf
from codistill_jax import teachers
from codistill_jax import validate
from codistill_jax.errors import ConfigError

_CONFIG = cli.define_config_flag()
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", None, "Devices of the target job (all groups together); "
    "default: the devices JAX sees. On CPU these are fake devices.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "Compile for a TPU slice instead, e.g. 'v5e:2x2' "
    "(jax.experimental.topologies; needs libtpu).")
_BUDGET = flags.DEFINE_string(
    "max_memory_per_device", None, "Fail (exit 3) if one device needs more, "
    "e.g. '16GiB', '512MiB' or bytes.")
_BANDWIDTH = flags.DEFINE_string(
    "storage_bandwidth", "1GB", "Bytes per second a group writes to the "
    "exchange dir (e.g. '1GB', '200MiB'), to time a publish.")
_JSON = flags.DEFINE_string("json_out", None, "Also write the report here.")
_WINDOWED = flags.DEFINE_bool(
    "windowed_einsum", True,
    "TPU: let XLA turn all-gather + matmul into a loop of windowed matmuls "
    "(its default). The cost model counts a loop's body once, so with such "
    "loops the step estimate is too low; --nowindowed_einsum compiles "
    "without them for an estimate that counts every matmul.")

# libtpu options that keep the SPMD partitioner from making windowed-einsum
# loops (`--nowindowed_einsum`).
NO_WINDOWED_EINSUM = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                      "xla_tpu_enable_windowed_einsum_for_reduce_scatter":
                      False}

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10,
          "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, flag: str = "--max_memory_per_device") -> int:
  """'16GiB' -> 17179869184; raises ConfigError naming `flag` otherwise."""
  m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text or "")
  if not m or m.group(2).lower() not in _UNITS or not float(m.group(1)):
    raise ConfigError(f"{flag}={text!r} is not a size; use "
                      "e.g. 16GiB, 512MiB or a number of bytes")
  return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _gib(n: float) -> str:
  return f"{n / 2**30:.3f} GiB" if n >= 2**26 else f"{n / 2**20:.2f} MiB"


@dataclasses.dataclass
class Report:
  """What one device needs for one train step of one group, and how fast."""
  group: int | None  # Which group's step; None: every group is alike.
  groups: int
  devices_per_group: int
  device_kind: str
  teachers: int  # Stacked teacher param sets in the step (G-1 for peers).
  params: int  # Parameters of the student.
  argument_bytes: int  # State + batch + teachers (one device's shards).
  output_bytes: int
  alias_bytes: int  # Outputs written into donated arguments (the state).
  temp_bytes: int
  code_bytes: int
  peak_bytes: int  # XLA's own peak of live buffers (0 if not given).
  flops: float  # Per device per step (XLA's cost analysis).
  model_flops: float  # Per device per step by the model's count (0: none).
  compile_s: float
  unit: str  # 'tokens' or 'examples'.
  per_step: int  # Units one group's step consumes.
  step_s: float | None = None  # The TPU compiler's estimate (optimal_seconds).
  peak_flops: float = 0.0  # Per device (perf.peak_flops).
  hbm_bytes: float | None = None  # Per device (perf.HBM_BYTES).
  publish_bytes: int = 0  # Params one group publishes per exchange.
  storage_bandwidth: float = 1e9  # Bytes/s assumed for a publish.
  scanned: bool = False  # A scanned layer loop: XLA counts its body once.
  uncosted_ops: int = 0  # Calls the estimate counted -1 s each: added back.
  while_loops: int = 0  # In the compiled program: bodies counted once.

  @property
  def total_bytes(self) -> int:
    """Live at once: inputs, outputs not aliased to them, scratch, code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes +
            self.temp_bytes + self.code_bytes)

  @property
  def mfu(self) -> float | None:
    """Model FLOPs utilisation the compiler's step time implies."""
    if not (self.step_s and self.peak_flops):
      return None
    return perf.mfu(self.model_flops or self.flops, 1 / self.step_s, 1,
                    self.peak_flops)

  @property
  def per_chip_per_s(self) -> float | None:
    if not self.step_s:
      return None
    return self.per_step / self.step_s / self.devices_per_group

  @property
  def fits(self) -> bool | None:
    return None if not self.hbm_bytes else self.total_bytes <= self.hbm_bytes

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self), "total_bytes": self.total_bytes,
            "mfu": self.mfu, "per_chip_per_s": self.per_chip_per_s,
            "fits": self.fits}

  def lines(self) -> list[str]:
    who = (f"groups {self.groups} x" if self.group is None else
           f"group {self.group} of {self.groups}:")
    out = [
        f"{who} {self.devices_per_group} {self.device_kind} devices, "
        f"{self.teachers} stacked teacher(s), {self.params:,} params",
        f"per device: arguments {_gib(self.argument_bytes)}, outputs "
        f"{_gib(self.output_bytes)} (aliased {_gib(self.alias_bytes)}), "
        f"temporaries {_gib(self.temp_bytes)}, code {_gib(self.code_bytes)}",
        f"per device total {_gib(self.total_bytes)}"
        + (f" of {_gib(self.hbm_bytes)} HBM: "
           f"{'fits' if self.fits else 'does NOT fit'}" if self.hbm_bytes
           else "") + f"; {self.flops / 1e9:.3f} GFLOP per device per step; "
        f"compiled in {self.compile_s:.1f}s" + (
            f" (model's count {self.model_flops / 1e9:.3f})"
            if self.model_flops else "")]
    if self.step_s:
      out.append(
          f"estimated step {1e3 * self.step_s:.2f} ms (the compiler's); MFU "
          + (f"{100 * self.mfu:.1f}% of {self.peak_flops / 1e12:.0f} TFLOP/s"
             if self.mfu is not None else "unknown (no peak for this chip)")
          + f"; {perf.si(self.per_chip_per_s)} {self.unit}/s per chip")
      if self.uncosted_ops:
        out.append(f"note: {self.uncosted_ops} {'/'.join(UNCOSTED_CALLS)} "
                   "call(s) counted as free (the compiler's estimate gives "
                   "each -1 s)")
      if self.while_loops and not self.scanned:
        out.append(f"warning: the program has {self.while_loops} loop(s) "
                   "(windowed-einsum matmuls) whose bodies the compiler's "
                   "flops and step time count once: a low estimate; "
                   "--nowindowed_einsum compiles without them")
      if self.scanned:
        out.append("warning: the layers are scanned and the compiler's "
                   "flops and step time count the loop's body once; "
                   "--config.model.scan_layers=False gives the whole step")
    if self.teachers and self.publish_bytes:
      out.append(
          f"publish per exchange {_gib(self.publish_bytes)}: "
          f"{self.publish_bytes / self.storage_bandwidth:.2f} s at "
          f"{self.storage_bandwidth / 1e9:g} GB/s (--storage_bandwidth)")
    return out


# Custom calls the TPU compiler's cost model cannot cost and counts as -1 s
# each in `optimal_seconds` (libtpu 0.0.42.1). ConcatBitcast concatenates
# adjacent buffers by reinterpreting them (no data moves); v5e and v6e
# programs use it around sliced all-gathers (a 1-layer 125M's forward on
# v5e 8x8: two of them and an estimate of -1.993 s).
UNCOSTED_CALLS = ("ConcatBitcast",)


def estimated_step(compiled, cost: dict) -> tuple[float | None, int]:
  """The compiler's step time with uncosted calls counted as free, and how
  many there were; None where there is no (positive) estimate."""
  seconds = cost.get("optimal_seconds")
  if seconds is None:
    return None, 0
  text = compiled.as_text() or ""
  n = sum(text.count(f'custom_call_target="{c}"') for c in UNCOSTED_CALLS)
  seconds = float(seconds) + n
  return (seconds if seconds > 0 else None), n


def distinct_groups(config) -> list[int]:
  """The groups whose steps differ: 0, and each group that sets fields of
  its own (`config.group.g<i>`); the others compile as group 0."""
  return [g for g in range(config.codistill.num_groups)
          if g == 0 or config_lib.group_overrides(config, g)]


def check(config, devices=None, storage_bandwidth: float = 1e9,
          compiler_options: dict | None = None, group: int | None = None
          ) -> Report:
  """Compiles one group's train step for `devices` (all groups'); no compute.

  Args:
    config: the experiment config (validated for this device count).
    devices: the target's devices (default: jax.devices()); they may belong
      to a topology that is not attached.
    storage_bandwidth: bytes/s to time one publish at.
    compiler_options: passed to XLA's compile (e.g. NO_WINDOWED_EINSUM).
    group: which group (its own model, batch, devices: `config.group`);
      default the last (every group the same) or 0 (groups that differ).
  """
  devices = list(devices if devices is not None else jax.devices())
  groups = config.codistill.num_groups
  validate.validate(config, num_devices=len(devices))
  sizes = mesh_lib.group_sizes(config, list(range(groups)), len(devices))
  alike = len(distinct_groups(config)) == 1
  if group is None:
    # Every group the same: the last one's step (libtpu's compile-only
    # client refuses some sets that hold chip 0); groups that differ: 0.
    group = groups - 1 if alike else 0
  gconf = config_lib.group_config(config, group)
  # The slice is carved (and checked) before anything compiles: libtpu
  # aborts the whole process on some device sets.
  group_devices = mesh_lib.slice_groups(groups, devices, sizes)[group]
  mesh = mesh_lib.make_mesh(group_devices, gconf.sharding.model_axis)
  datasets = data_lib.get_module(config.data.name).get_datasets(
      gconf, group=0, num_groups=groups, process_index=0, process_count=1)
  setup = build.build(gconf, datasets, mesh)
  example = next(iter(datasets.train(0)))
  # The teacher source says what the step takes: stacked teachers (peers,
  # checkpoint) or targets in the batch (service, stored). Nothing is read.
  source = teachers.source_class(config)
  layout = source.layout(config, setup, example, group)
  batch = {**build.with_shardings(example, mesh_lib.batch_sharding(mesh)),
           **layout.batch}
  step_fn = build.train_step(gconf, setup, layout)
  t = time.perf_counter()
  try:
    compiled = step_fn.lower(setup.abstract, batch, *layout.args).compile(
        compiler_options)
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a step that cannot fit: say so in one line.
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text:
      raise
    detail = text.split("RESOURCE_EXHAUSTED:", 1)[1].strip().splitlines()[0]
    raise ConfigError(
        f"one group's step does not fit on {len(group_devices)} "
        f"{getattr(group_devices[0], 'device_kind', 'device')} chips: "
        f"{detail}; give each group more chips (fewer groups or a larger "
        "slice), or lower its memory (config.microbatches, "
        "config.model.remat, config.data.batch_size)") from None
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else {}
  cost = cost or {}
  step_s, uncosted = estimated_step(compiled, cost)
  loops = len(re.findall(r"\bwhile\(", compiled.as_text() or ""))
  device = group_devices[0]
  unit, per_step = perf.describe(example)
  params = jax.tree.leaves(setup.abstract.params)
  n_teachers = layout.num_teachers
  return Report(
      group=None if alike else group,
      groups=groups, devices_per_group=len(group_devices),
      device_kind=getattr(device, "device_kind", device.platform),
      teachers=n_teachers,
      params=sum(x.size for x in params),
      argument_bytes=mem.argument_size_in_bytes,
      output_bytes=mem.output_size_in_bytes,
      alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
      code_bytes=mem.generated_code_size_in_bytes,
      peak_bytes=getattr(mem, "peak_memory_in_bytes", 0) or 0,
      flops=float(cost.get("flops", 0.0)),
      model_flops=0.0 if layout.mixed else perf.model_flops(
          setup.model, example, n_teachers) / len(group_devices),
      compile_s=compile_s,
      unit=unit, per_step=per_step,
      step_s=step_s, uncosted_ops=uncosted, while_loops=loops,
      peak_flops=perf.peak_flops(device) if device.platform != "cpu" else 0.0,
      hbm_bytes=perf.hbm_bytes(device),
      publish_bytes=(sum(x.size * x.dtype.itemsize for x in params)
                     if source.publishes else 0),
      storage_bandwidth=storage_bandwidth,
      scanned=bool(getattr(setup.model, "scan_layers", False)))


def _target_devices():
  """The devices to compile for, from --topology or --num_devices."""
  if _TOPOLOGY.value:
    # A compile-only client opens no chip: it need not hold libtpu's
    # one-process lock (which a training job on this host may hold).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
      topo = topologies.get_topology_desc(topology_name=_TOPOLOGY.value,
                                          platform="tpu")
    except Exception as e:  # pylint: disable=broad-except
      # Anything from a missing libtpu to an unknown name: say which.
      raise ConfigError(f"--topology={_TOPOLOGY.value}: cannot describe it "
                        f"({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "needs libtpu and a name like v5e:2x2") from None
    return topo.devices
  if _NUM_DEVICES.value:
    # Only the CPU backend reads this, and only before it starts: on a CPU
    # host it fakes the target's device count; elsewhere it is a no-op.
    jax.config.update("jax_num_cpu_devices", _NUM_DEVICES.value)
  devices = jax.devices()
  if _NUM_DEVICES.value and _NUM_DEVICES.value != len(devices):
    raise ConfigError(
        f"--num_devices={_NUM_DEVICES.value} but JAX sees {len(devices)} "
        f"{devices[0].platform} devices; for another accelerator count "
        "use --topology")
  return devices


def main(argv):
  del argv
  if _NUM_DEVICES.value is not None:
    if _TOPOLOGY.value:
      raise ConfigError("--num_devices and --topology both name the target; "
                        "give one (a slice's devices come with --topology)")
    cli.check_at_least(_NUM_DEVICES.value, "--num_devices")
  budget = (parse_bytes(_BUDGET.value) if _BUDGET.value is not None
            else None)
  bandwidth = parse_bytes(_BANDWIDTH.value, "--storage_bandwidth")
  if _JSON.value is not None:
    cli.check_output(_JSON.value, "--json_out")
  config, devices = _CONFIG.value, _target_devices()
  # Groups that differ (config.group) each get their own report.
  reports = [check(config, devices, bandwidth,
                   None if _WINDOWED.value or not _TOPOLOGY.value
                   else NO_WINDOWED_EINSUM,
                   group=None if len(distinct_groups(config)) == 1 else g)
             for g in distinct_groups(config)]
  for report in reports:
    print("\n".join(report.lines()))
  report = max(reports, key=lambda r: r.total_bytes)  # What must fit.
  if _JSON.value:
    try:
      with open(_JSON.value, "w") as f:
        json.dump(reports[0].to_json() if len(reports) == 1 else
                  [r.to_json() for r in reports], f, indent=2)
    except OSError as e:
      raise ConfigError(f"--json_out={_JSON.value}: cannot write it "
                        f"({e.strerror}); name a writable file") from None
  if budget is not None and report.total_bytes > budget:
    cli.fail(f"the train step needs {_gib(report.total_bytes)} per device, "
             f"over --max_memory_per_device={_BUDGET.value}; use more "
             "devices per group, 'fsdp' sharding rules, "
             "codistill.teacher_dtype='bfloat16' or a smaller "
             "data.batch_size", code=3)


if __name__ == "__main__":
  cli.run(main, required=("config",), output="--json_out")

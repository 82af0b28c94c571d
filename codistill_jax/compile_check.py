r"""Ahead-of-time compile check: will a config's train step fit the target?

Lowers and compiles one group's sharded train step -- with the stacked
teacher params of its G-1 peers when it codistils -- for a target device
count, without creating a parameter or running a step, and reports what XLA
says one device needs (arguments, outputs, temporaries, code) and the step's
flops. A pod run that will not fit fails here, in seconds, on a CPU.

  python -m codistill_jax.compile_check --config=configs/kernel_lm.py \
      --num_devices=64 --max_memory_per_device=16GiB [--config.a.b=value]

The state is built exactly as the trainer builds it (`build.build`:
`jax.eval_shape` + the config's sharding rules) and the step is the trainer's
own jitted function (`build.jit_train_step`, with the teacher source's
`layout`), lowered with `ShapeDtypeStruct`s instead of arrays. The data module
is asked for one batch (shapes only matter) and the dataset's sizes
(vocabulary, classes), so the data must be readable where the check runs.

Targets: `--num_devices=N` compiles for N devices of the platform JAX sees
(on a CPU host N fake CPU devices; XLA's CPU memory figures are a proxy
for an accelerator's). `--topology=v5e:4x4` compiles for
a TPU slice that is not attached (`jax.experimental.topologies`, needs
libtpu; the figures are then the TPU compiler's own).

Exit codes: 0 fits (or no budget given), 2 bad input (one `error:` line),
3 over `--max_memory_per_device` (one `error:` line naming the figure).
"""

import dataclasses
import json
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
from codistill_jax import teachers
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
_JSON = flags.DEFINE_string("json_out", None, "Also write the report here.")

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10,
          "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
  """'16GiB' -> 17179869184; raises ConfigError on anything else."""
  m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text or "")
  if not m or m.group(2).lower() not in _UNITS:
    raise ConfigError(f"--max_memory_per_device={text!r} is not a size; use "
                      "e.g. 16GiB, 512MiB or a number of bytes")
  return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _gib(n: float) -> str:
  return f"{n / 2**30:.3f} GiB" if n >= 2**26 else f"{n / 2**20:.2f} MiB"


@dataclasses.dataclass
class Report:
  """What one device needs for one train step of one group."""
  groups: int
  devices_per_group: int
  teachers: int  # Stacked teacher param sets in the step (G-1 for peers).
  params: int  # Parameters of the student.
  argument_bytes: int  # State + batch + teachers (one device's shards).
  output_bytes: int
  alias_bytes: int  # Outputs written into donated arguments (the state).
  temp_bytes: int
  code_bytes: int
  flops: float  # Per device per step (XLA's cost analysis).
  compile_s: float

  @property
  def total_bytes(self) -> int:
    """Live at once: inputs, outputs not aliased to them, scratch, code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes +
            self.temp_bytes + self.code_bytes)

  def lines(self) -> list[str]:
    return [
        f"groups {self.groups} x {self.devices_per_group} devices, "
        f"{self.teachers} stacked teacher(s), {self.params:,} params",
        f"per device: arguments {_gib(self.argument_bytes)}, outputs "
        f"{_gib(self.output_bytes)} (aliased {_gib(self.alias_bytes)}), "
        f"temporaries {_gib(self.temp_bytes)}, code {_gib(self.code_bytes)}",
        f"per device total {_gib(self.total_bytes)}; "
        f"{self.flops / 1e9:.3f} GFLOP per step; compiled in "
        f"{self.compile_s:.1f}s",
    ]


def check(config, devices=None) -> Report:
  """Compiles one group's train step for `devices` (all groups'); no compute.

  Args:
    config: the experiment config (validated for this device count).
    devices: the target's devices (default: jax.devices()); they may belong
      to a topology that is not attached.
  """
  devices = list(devices if devices is not None else jax.devices())
  groups = config.codistill.num_groups
  config_lib.validate(config, num_devices=len(devices))
  group_devices = mesh_lib.group_devices(groups, devices)[0]
  mesh = mesh_lib.make_mesh(group_devices)
  datasets = data_lib.get_module(config.data.name).get_datasets(
      config, group=0, num_groups=groups, process_index=0, process_count=1)
  setup = build.build(config, datasets, mesh)
  example = next(iter(datasets.train(0)))
  # The teacher source says what the step takes: stacked teachers (peers,
  # checkpoint) or targets in the batch (service, stored). Nothing is read.
  layout = teachers.source_class(config).layout(config, setup, example)
  batch = {**build.with_shardings(example, mesh_lib.batch_sharding(mesh)),
           **layout.batch}
  term = build.distill_term(config, setup, layout.teacher,
                            precomputed=layout.distills and
                            layout.teacher is None)
  step_fn = build.jit_train_step(config, setup, term, layout.arg_shardings)
  t = time.perf_counter()
  compiled = step_fn.lower(setup.abstract, batch, *layout.args).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else {}
  return Report(
      groups=groups, devices_per_group=len(group_devices),
      teachers=sum(int(a.weights.shape[0]) for a in layout.args),
      params=sum(x.size for x in jax.tree.leaves(setup.abstract.params)),
      argument_bytes=mem.argument_size_in_bytes,
      output_bytes=mem.output_size_in_bytes,
      alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
      code_bytes=mem.generated_code_size_in_bytes,
      flops=float((cost or {}).get("flops", 0.0)), compile_s=compile_s)


def _target_devices():
  """The devices to compile for, from --topology or --num_devices."""
  if _TOPOLOGY.value:
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
  if _NUM_DEVICES.value is not None and _NUM_DEVICES.value < 1:
    raise ConfigError(f"--num_devices={_NUM_DEVICES.value} must be a positive "
                      "device count")
  budget = (parse_bytes(_BUDGET.value) if _BUDGET.value is not None
            else None)
  report = check(_CONFIG.value, _target_devices())
  print("\n".join(report.lines()))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({**dataclasses.asdict(report),
                 "total_bytes": report.total_bytes}, f, indent=2)
  if budget is not None and report.total_bytes > budget:
    cli.fail(f"the train step needs {_gib(report.total_bytes)} per device, "
             f"over --max_memory_per_device={_BUDGET.value}; use more "
             "devices per group, 'fsdp' sharding rules, "
             "codistill.teacher_dtype='bfloat16' or a smaller "
             "data.batch_size", code=3)


if __name__ == "__main__":
  cli.run(main, required=("config",))

r"""Ahead-of-time compile check: will a config's train step fit the target?

Lowers and compiles one group's sharded train step -- with the stacked
teacher params of its G-1 peers when it codistils -- for a target device
count, without creating a parameter or running a step, and reports what XLA
says one device needs (arguments, outputs, temporaries, code) and the step's
flops. A pod run that will not fit fails here, in seconds, on a CPU.

  python -m codistill_jax.compile_check --config=configs/kernel_lm.py \
      --num_devices=64 --max_memory_per_device=16GiB [--config.a.b=value]

The state is built exactly as the trainer builds it (`train.build`:
`jax.eval_shape` + the config's sharding rules) and the step is the
trainer's own jitted function (`train.jit_train_step`), lowered with
`ShapeDtypeStruct`s instead of arrays. The data module is asked for one batch
(shapes only matter) and the dataset's sizes (vocabulary, classes), so the
data must be readable where the check runs.

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
import sys
import time
from typing import Any

from absl import app
from absl import flags
import jax
from jax.experimental import topologies
import jax.numpy as jnp
from ml_collections import config_flags

from codistill_jax import config_lib
from codistill_jax import data as data_lib
from codistill_jax import exchange
from codistill_jax import mesh as mesh_lib
from codistill_jax import models as models_lib
from codistill_jax import step as step_lib
from codistill_jax import train
from codistill_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with ':arg'.",
    lock_config=True)
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


def _abstract(tree, shardings):
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
      shardings)


def _teachers(config, setup, datasets, mesh):
  """(apply_fn, abstract stacked Teachers, their sharding), or Nones."""
  cd = config.codistill
  float_dtype = jnp.dtype(cd.teacher_dtype)
  cast = lambda a: (float_dtype if jnp.issubdtype(a.dtype, jnp.floating)
                    else a.dtype)
  if cd.teacher_source == "peers" and cd.num_groups > 1:
    apply_fn, params, n = setup.model.apply, setup.abstract.params, (
        cd.num_groups - 1)
  elif cd.teacher_source == "checkpoint":
    # The checkpoint is not read: its architecture's shapes are what count.
    name = cd.teacher_model_name or config.model_name
    kwargs = (cd.teacher_model.to_dict() if cd.teacher_model_name
              else config.model.to_dict())
    teacher = models_lib.build(name, kwargs, datasets.info)
    # pylint: disable-next=protected-access
    example = train._example_inputs(next(iter(datasets.train(0))))
    params = jax.eval_shape(
        lambda: teacher.init(jax.random.PRNGKey(0), example, train=False))
    repl = mesh_lib.replicated(mesh)
    params = _abstract(params, jax.tree.map(lambda _: repl, params))
    apply_fn, n = teacher.apply, 1
  else:
    return None, None, None
  sharding = exchange.teachers_sharding(
      jax.tree.map(lambda a: a.sharding, params))
  stacked = step_lib.Teachers(
      params=jax.tree.map(lambda a: jax.ShapeDtypeStruct((n, *a.shape),
                                                         cast(a)), params),
      weights=jax.ShapeDtypeStruct((n,), jnp.float32))
  return apply_fn, _abstract(stacked, sharding), sharding


def _service_targets(config, setup, batch, sharding):
  """Abstract `batch['teacher']` of the teacher service: probs or top-k."""
  logits = jax.eval_shape(
      lambda p, x: setup.model.apply(p, x, train=False),
      setup.abstract.params, batch["inputs"])
  k = config.codistill.topk
  if not k:
    shapes = {"probs": (logits.shape, jnp.float32)}
  else:
    shape = (*logits.shape[:-1], k)
    shapes = {"topk_ids": (shape, jnp.int32),
              "topk_probs": (shape, jnp.float32)}
  return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for name, (shape, dtype) in shapes.items()}


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
  setup = train.build(config, datasets, mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
      next(iter(datasets.train(0))))
  apply_fn, teachers, teacher_sharding = _teachers(config, setup, datasets,
                                                   mesh)
  service = config.codistill.teacher_source == "service"
  if service:  # The targets arrive in the batch, as the workers send them.
    batch = {**batch, "teacher": _service_targets(config, setup, batch,
                                                  batch_sharding)}
  step_fn = train.jit_train_step(config, setup, mesh, apply_fn,
                                 teacher_sharding, precomputed=service)
  args = (setup.abstract, batch) + ((teachers,) if teachers else ())
  t = time.perf_counter()
  compiled = step_fn.lower(*args).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else {}
  return Report(
      groups=groups, devices_per_group=len(group_devices),
      teachers=0 if teachers is None else int(teachers.weights.shape[0]),
      params=sum(x.size for x in jax.tree.leaves(setup.abstract.params)),
      argument_bytes=mem.argument_size_in_bytes,
      output_bytes=mem.output_size_in_bytes,
      alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
      code_bytes=mem.generated_code_size_in_bytes,
      flops=float((cost or {}).get("flops", 0.0)), compile_s=compile_s)


def _fail(message: str, code: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


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
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config=configs/kernel_lm.py:quick")
  try:
    budget = (parse_bytes(_BUDGET.value) if _BUDGET.value is not None
              else None)
    report = check(_CONFIG.value, _target_devices())
  except ConfigError as e:
    _fail(str(e))
  print("\n".join(report.lines()))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({**dataclasses.asdict(report),
                 "total_bytes": report.total_bytes}, f, indent=2)
  if budget is not None and report.total_bytes > budget:
    _fail(f"the train step needs {_gib(report.total_bytes)} per device, over "
          f"--max_memory_per_device={_BUDGET.value}; use more devices per "
          "group, 'fsdp' sharding rules, codistill.teacher_dtype='bfloat16' "
          "or a smaller data.batch_size", code=3)


if __name__ == "__main__":
  app.run(main)

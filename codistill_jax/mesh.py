"""Device meshes, one sub-mesh per group, and sharding rules from config.

Every group is an ordinary data-parallel job on its own mesh: 1-D with axis
'data', or with `config.sharding.model_axis` = m > 1 a 2-D ('data', 'model')
mesh of (devices / m, m). The batch is split over 'data' (and replicated over
'model'). Parameters are replicated, or, for the rules that say 'fsdp', split
along their largest divisible dimension over 'data' (ZeRO-3 style; XLA
inserts the all-gathers), or laid out by a spec that names an axis per
dimension: 'data' (FSDP) or 'model' (tensor parallelism, e.g. attention
heads and the MLP's hidden units). Models name no axes: the rules, a list of
(regex over the parameter path, strategy) pairs in `config.sharding.rules`,
are data in the config. The first matching rule wins; unmatched parameters
are replicated.
"""

import functools
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from codistill_jax import config_lib
from codistill_jax.errors import ConfigError

DATA_AXIS = "data"
MODEL_AXIS = "model"
STRATEGIES = ("replicate", "fsdp")


def group_devices(num_groups: int, devices: Sequence[Any] | None = None,
                  sizes: Sequence[int] | None = None):
  """Splits the (global) devices into `num_groups` sub-meshes.

  One process: contiguous runs of its devices, of `sizes` (groups of unequal
  size; default equal shares). A multi-process job (one JAX job holding G
  sub-meshes): every group takes the same share of every process's devices,
  so each group spans all processes and every process runs each group's
  steps, collectives and Orbax saves in the same order. Groups on disjoint
  subsets of the processes are not offered: with orbax-checkpoint 0.12.8 a
  save of a group whose processes exclude process 0 never commits (its
  barrier is not met), and a group held by one process cannot be saved at
  all (Orbax takes arrays one process holds whole for pmap outputs). Run
  such groups (and groups of unequal size across hosts) as separate jobs.
  """
  devices = sorted(devices if devices is not None else jax.devices(),
                   key=lambda d: (d.process_index, d.id))
  if sizes is not None and len(set(sizes)) > 1:
    if len({d.process_index for d in devices}) > 1:
      raise ConfigError(
          f"groups of unequal size ({list(sizes)} devices) in one job of "
          "several processes: each group takes an equal share of every "
          "process there; run each group as its own job (--groups=g, "
          "sharing config.codistill.exchange_dir; see docs/groups.md)")
    if sum(sizes) != len(devices):
      raise ConfigError(f"the groups' devices {list(sizes)} do not add up "
                        f"to the {len(devices)} devices of this job")
    ends = np.cumsum([0, *sizes])
    return [devices[a:b] for a, b in zip(ends[:-1], ends[1:])]
  if num_groups < 1 or len(devices) % num_groups:
    raise ConfigError(
        f"config.codistill.num_groups={num_groups} does not divide the {len(devices)} "
        "devices; use a divisor of the device count")
  by_process: dict[int, list[Any]] = {}
  for d in devices:
    by_process.setdefault(d.process_index, []).append(d)
  hosts = list(by_process.values())
  if any(len(h) % num_groups for h in hosts):
    raise ConfigError(
        f"{num_groups} groups do not divide the devices of each of the "
        f"{len(hosts)} processes ({sorted({len(h) for h in hosts})} each): "
        "in one multi-process job every group takes an equal share of every "
        "process's devices; use a divisor of the devices per process, or run "
        "each group as its own job (--groups=g, sharing "
        "config.codistill.exchange_dir; see docs/scale.md)")
  return [[d for h in hosts for d in h[g * len(h) // num_groups:
                                         (g + 1) * len(h) // num_groups]]
          for g in range(num_groups)]


def _devices_field(config, group: int) -> str:
  """How group `group`'s device count is named in a message."""
  if "devices" in config_lib.group_overrides(config, group):
    return (f"config.group.{config_lib.group_key(group)}.devices="
            f"{config_lib.group_config(config, group).devices}")
  return f"config.devices={config.devices} (group {group})"


def _not_dividing(config, num_devices: int, here: int) -> str:
  return (f"config.codistill.num_groups={config.codistill.num_groups} does "
          f"not divide the {num_devices} devices; use a divisor of "
          f"{num_devices}, give this process more devices (on a CPU host: "
          f"XLA_FLAGS=--xla_force_host_platform_device_count={here}) "
          "or run one process per group (experiments/launch_local.py)")


def group_sizes(config, groups: Sequence[int], num_devices: int) -> list[int]:
  """Devices of each of `groups` (the groups of one job) on `num_devices`.

  A group's `devices` (its `config.group.g<i>.devices`, or the shared
  `config.devices`) when set; the groups that set none share what is left
  equally. The groups of a job must add up to its devices.
  """
  named = {g: config_lib.group_config(config, g).devices for g in groups}
  fixed = [g for g in groups if named[g]]
  free = [g for g in groups if not named[g]]
  if not fixed:
    if num_devices % len(groups):
      raise ConfigError(_not_dividing(config, num_devices, len(groups)))
    return [num_devices // len(groups)] * len(groups)
  left = num_devices - sum(named[g] for g in fixed)
  names = " and ".join(_devices_field(config, g) for g in fixed)
  if free and (left <= 0 or left % len(free)):
    raise ConfigError(
        f"{names} leave {left} of the {num_devices} devices for the "
        f"{len(free)} other group(s) {free}, which need an equal share of at "
        "least 1 each; set the groups' devices so that they add up to "
        f"{num_devices}")
  if not free and left:
    raise ConfigError(
        f"{names} add up to {num_devices - left}, not the {num_devices} "
        f"devices of this job; set the groups' devices so that they add up "
        f"to {num_devices}")
  return [named[g] or (left // len(free)) for g in groups]


def slice_groups(num_groups: int, devices: Sequence[Any],
                 sizes: Sequence[int] | None = None) -> list[list[Any]]:
  """Carves one TPU slice into `num_groups` sub-slices (any platform): equal
  ones, or of `sizes` devices each (groups of unequal size: contiguous runs
  in the same order, each of which must be such a block).

  TPU devices are ordered as TPU numbers them (z, then y, then x, then core,
  slowest first: the device-id order of v4, v5e, v5p and v6e) and cut into
  contiguous runs, so the slowest physical axis is split first: a v5e 4x4
  gives two 4x2 blocks (G = 2) or four 4x1 rows (G = 4), a v5p 4x4x8 two
  4x4x4 halves. Each group must be a box of whole chips whose every side
  divides, or is a multiple of, a host's side: what the TPU compiler accepts
  (other sets fail to compile and some abort the process, so this is checked
  before anything compiles). Other platforms: contiguous runs of the
  id-ordered devices.

  Raises ConfigError naming config.codistill.num_groups and the G that fit.
  """
  devices = list(devices)
  n = len(devices)
  if sizes is not None and len(set(sizes)) > 1:
    return _slice_sizes(devices, list(sizes))
  if num_groups < 1 or n % num_groups:
    raise ConfigError(
        f"config.codistill.num_groups={num_groups} does not divide the {n} "
        f"devices of the slice; use one of "
        f"{[g for g in range(1, n + 1) if n % g == 0]}")
  per = n // num_groups
  if devices[0].platform != "tpu":
    devices.sort(key=lambda d: d.id)
    return [devices[g * per:(g + 1) * per] for g in range(num_groups)]
  devices.sort(key=lambda d: (*reversed(tuple(d.coords)), d.core_on_chip))
  if not _carves(devices, num_groups):
    fits = [g for g in range(1, n + 1) if n % g == 0 and _carves(devices, g)]
    host = _chip_box([d for d in devices
                      if d.process_index == devices[0].process_index])
    raise ConfigError(
        f"config.codistill.num_groups={num_groups}: {per} devices per group "
        f"are not a block of the {'x'.join(map(str, _chip_box(devices)))} "
        f"slice whose sides tile a host's {'x'.join(map(str, host))} chips; "
        f"use one of {fits}")
  return [devices[g * per:(g + 1) * per] for g in range(num_groups)]


def _slice_sizes(devices: list[Any], sizes: list[int]) -> list[list[Any]]:
  """`slice_groups` for groups of unequal size."""
  if sum(sizes) != len(devices):
    raise ConfigError(f"the groups' devices {sizes} do not add up to the "
                      f"{len(devices)} devices of the slice")
  if devices[0].platform != "tpu":
    devices.sort(key=lambda d: d.id)
  else:
    devices.sort(key=lambda d: (*reversed(tuple(d.coords)), d.core_on_chip))
  ends = np.cumsum([0, *sizes])
  runs = [devices[a:b] for a, b in zip(ends[:-1], ends[1:])]
  if devices[0].platform == "tpu":
    host = _chip_box([d for d in devices
                      if d.process_index == devices[0].process_index])
    for g, run in enumerate(runs):
      box = _chip_box(run)
      if box is None or (host and any(b % h and h % b
                                      for b, h in zip(box, host))):
        raise ConfigError(
            f"group {g}'s {sizes[g]} devices (config.group.g{g}.devices) "
            f"are not a block of the "
            f"{'x'.join(map(str, _chip_box(devices)))} slice whose sides "
            "tile a host's chips, cut in order after the groups before it; "
            "give the groups sizes that carve the slice into boxes")
  return runs


def _chip_box(devices: Sequence[Any]) -> tuple[int, ...] | None:
  """The (x, y, z) sides of the box the devices' chips fill, or None."""
  chips = {tuple(d.coords) for d in devices}
  lo = [min(c[i] for c in chips) for i in range(3)]
  hi = [max(c[i] for c in chips) for i in range(3)]
  sides = tuple(h - l + 1 for l, h in zip(lo, hi))
  cores = {d.core_on_chip for d in devices}
  if len(chips) != np.prod(sides) or len(devices) != len(chips) * len(cores):
    return None
  return sides


def _carves(devices: Sequence[Any], num_groups: int) -> bool:
  """Whether `slice_groups` accepts `num_groups` for the sorted devices."""
  per = len(devices) // num_groups
  host = _chip_box([d for d in devices
                    if d.process_index == devices[0].process_index])
  for g in range(num_groups):
    box = _chip_box(devices[g * per:(g + 1) * per])
    if box is None or (host and any(b % h and h % b
                                    for b, h in zip(box, host))):
      return False
  return True


def make_mesh(devices: Sequence[Any], model_axis: int = 1) -> Mesh:
  """A group's mesh (automatic sharding): 1-D 'data' when `model_axis` is 1,
  else ('data', 'model') of (len(devices) / model_axis, model_axis), the
  'model' axis over neighbouring devices (one host's, where it fits)."""
  if model_axis == 1:
    return Mesh(np.asarray(devices), (DATA_AXIS,))
  return Mesh(np.asarray(devices).reshape(-1, model_axis),
              (DATA_AXIS, MODEL_AXIS))



def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


# Logical activation axes a model may constrain (`flax.linen.
# with_logical_constraint`) and the mesh axes they map to: the batch over
# 'data'; names without a rule stay whole.
ACTIVATION_RULES = (("batch", DATA_AXIS),)


def traced_on(mesh: Mesh, fn):
  """`fn`, traced with `mesh` and `ACTIVATION_RULES` in context, for jit.

  A model's activation constraints apply only here; elsewhere (no mesh in
  context, e.g. the teacher service's single device) they are no-ops.
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with (jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
          nn.logical_axis_rules(ACTIVATION_RULES)):
      return fn(*args, **kwargs)

  return wrapped


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_config(config, num_devices: int | None = None,
                 num_groups_here: int | None = None,
                 groups: Sequence[int] | None = None) -> None:
  """Sharding rules, and groups and batches that divide the devices.

  Args:
    config: the experiment config.
    num_devices: devices of this job (default: jax.device_count()).
    num_groups_here: how many groups this job runs (default: all started).
    groups: which (default: the first `num_groups_here`).
  """
  check_rules(config.sharding.rules)
  num_devices = num_devices or jax.device_count()
  if groups is None:
    n = num_groups_here or config.codistill.num_groups
    if n > num_devices:  # (Before a list of n groups: n may be anything.)
      raise ConfigError(_not_dividing(config, num_devices, n))
    groups = range(n)
  groups = list(groups)
  sizes = group_sizes(config, groups, num_devices)
  for g, per_group in zip(groups, sizes):
    gc = config_lib.group_config(config, g)
    try:
      _check_group(gc, per_group)
    except ConfigError as e:
      if gc is config:
        raise
      raise config_lib.group_error(config, g, e) from None


def _check_group(config, per_group: int) -> None:
  """One group's mesh and batches on its `per_group` devices."""
  check_rules(config.sharding.rules)
  model = config.sharding.model_axis
  if per_group % model:
    raise ConfigError(
        f"config.sharding.model_axis={model} does not divide the {per_group} "
        f"devices of a group; use one of "
        f"{[m for m in range(1, per_group + 1) if per_group % m == 0]}")
  data = per_group // model  # The batch is split over 'data' only.
  for name in ("batch_size", "eval_batch_size"):
    value = config.data[name]
    if value % data:
      raise ConfigError(
          f"config.data.{name}={value} is not divisible by the {data} "
          f"devices of a group's 'data' axis; use a multiple of {data}")
  k = config.microbatches
  if config.data.batch_size % (k * data):
    raise ConfigError(
        f"config.microbatches={k} pieces of config.data.batch_size="
        f"{config.data.batch_size} do not split evenly over the {data} "
        f"devices of a group's 'data' axis; use a batch that is a multiple "
        f"of {k * data}, or fewer microbatches")
  ns = config.noise_scale
  pieces = ns.pieces or max(data, 2)
  if ns.every and (pieces < 2 or config.data.batch_size % pieces):
    raise ConfigError(
        f"config.noise_scale.pieces={ns.pieces}: the noise scale cuts "
        f"config.data.batch_size={config.data.batch_size} into {pieces} "
        "pieces, which must be at least 2 and divide the batch; pick such a "
        "count (0: the group's data devices)")


def check_rules(rules) -> None:
  for i, rule in enumerate(rules):
    ok = len(rule) == 2 and isinstance(rule[0], str) and (
        rule[1] in STRATEGIES or (
            isinstance(rule[1], (tuple, list)) and
            all(a in (None, DATA_AXIS, MODEL_AXIS) for a in rule[1])))
    if not ok:
      raise ConfigError(
          f"config.sharding.rules[{i}]={rule!r} must be (regex, strategy) with "
          f"strategy one of {STRATEGIES} or a spec, one of None, "
          f"{DATA_AXIS!r} or {MODEL_AXIS!r} per dimension, e.g. "
          f"({DATA_AXIS!r}, {MODEL_AXIS!r})")
    try:
      re.compile(rule[0])
    except re.error as e:
      raise ConfigError(f"config.sharding.rules[{i}] regex {rule[0]!r} is "
                        f"invalid: {e}") from None


def path_str(path) -> str:
  """'params/params/Dense_0/kernel' for a pytree key path (dict keys,
  dataclass fields and sequence indices alike)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(
      k, "idx", k)))) for k in path)


def spec_for(name: str, shape: tuple[int, ...], rules, axes: dict[str, int],
             min_size: int) -> P:
  """The PartitionSpec of one parameter under `rules` on a mesh of `axes`.

  'replicate'; 'fsdp': the largest dimension 'data' divides is split over
  it; a spec (None, 'data' or 'model' per dimension; its last dimensions
  when the leaf has more, e.g. a scanned layers axis first): 'data' splits
  its dimension where the axis divides it, 'model' must divide it (a
  ConfigError otherwise) and means nothing on a mesh without a 'model' axis.
  """
  strategy = next((s for r, s in rules if re.fullmatch(r, name)), "replicate")
  if strategy == "replicate" or int(np.prod(shape)) < min_size:
    return P()
  if not isinstance(strategy, str):
    spec = [None] * (len(shape) - len(strategy)) + list(strategy)
    if len(spec) != len(shape):
      raise ConfigError(f"config.sharding.rules: spec {tuple(strategy)} for "
                        f"{name} has more dimensions than its shape {shape}")
    out = []
    for d, a in enumerate(spec):
      if a == MODEL_AXIS and axes.get(MODEL_AXIS, 1) > 1 and (
          shape[d] % axes[MODEL_AXIS]):
        raise ConfigError(
            f"config.sharding.model_axis={axes[MODEL_AXIS]} does not divide "
            f"dimension {d} ({shape[d]}) of {name} (shape {shape}), which "
            "config.sharding.rules split over 'model'; use a model axis "
            f"that divides {shape[d]} (e.g. the head count)")
      out.append(a if a in axes and shape[d] % axes[a] == 0 else None)
    return P(*out)
  # fsdp: split the largest dimension that the axis divides.
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % axes[DATA_AXIS] == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA_AXIS
      return P(*spec)
  return P()


def tree_shardings(mesh: Mesh, abstract_tree, rules, min_size: int = 0):
  """NamedShardings for every leaf of `abstract_tree` (e.g. a TrainState).

  Optimizer moments follow the rule of their parameter because they share its
  path suffix (opt_state/.../mu/params/Dense_0/kernel matches '.*kernel').
  """
  axes = dict(mesh.shape)

  def one(path, leaf):
    return NamedSharding(mesh, spec_for(path_str(path), tuple(leaf.shape),
                                        rules, axes, min_size))

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def shard_batch(batch, sharding: NamedSharding):
  """Host-local numpy batch -> global jax arrays split over 'data'."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

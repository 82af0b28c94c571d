"""The config skeleton, the check vocabulary and the one loader (no jax here).

Config files in `configs/` start from `base_config()` and fill in the model and
data; `load('configs/x.py:arg', overrides)` is how every command, test and
experiment turns a file into a locked `ConfigDict`. Neither imports jax, so
`--help` and a flag error answer at once.

It also holds the check vocabulary every owner of config fields uses
(`check_choice`, `check_ranges`, `check_like`) and `check_skeleton`: the base
config's keys, types and numeric ranges (declared once in `RANGES` next to the
fields). Composing every owner's checks is `validate.py`'s job, above the
owners; this module imports nothing of the package but `errors`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from typing import Any, Iterable, Mapping

import ml_collections

from codistill_jax.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
  """Fields every experiment has, with defaults; workload configs extend it."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Init and data-order seed of the run (retrains differ in it).
  # Module in codistill_jax/models/, or a dotted module path of your own.
  c.model_name = ""
  c.model = ml_collections.ConfigDict()  # kwargs of that module's Model.
  c.loss = "softmax_xent"  # Task loss: one of losses.TASK_LOSSES.

  c.data = ml_collections.ConfigDict()
  # Module in codistill_jax/data/, or a dotted module path of your own.
  c.data.name = ""
  c.data.batch_size = 128  # Global batch of one group (all its devices).
  c.data.eval_batch_size = 256  # Global eval batch; the last one is padded.
  c.data.split_seed = 0  # Fixed seed of the train/validation/test split.
  c.data.partition = "disjoint"  # 'disjoint' shards per group, or 'shared'.
  # Batches made and put on the devices ahead of the step, on a thread
  # (data/pipeline.Prefetch); 0 makes each in the loop, between steps; -1:
  # 2 unless this process's CPU devices already keep every core busy (then
  # a thread only competes with the steps).
  c.data.prefetch = -1

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # One of optim.OPTIMIZERS.
  c.optimizer.learning_rate = 1e-3  # Peak learning rate.
  c.optimizer.schedule = "cosine"  # One of optim.SCHEDULES, after warm-up.
  c.optimizer.warmup_steps = 0  # Linear warm-up from 0.
  c.optimizer.weight_decay = 0.0  # Decoupled (adamw) or L2 (sgd, momentum).
  c.optimizer.momentum = 0.9  # 'momentum' only (Nesterov).
  c.optimizer.b1 = 0.9  # adam/adamw.
  c.optimizer.b2 = 0.999  # adam/adamw.
  c.optimizer.grad_clip_norm = 0.0  # Clip by global norm; 0 disables.
  c.optimizer.milestones = (0.5, 0.75)  # 'step': fractions of total_steps.
  c.optimizer.decay_factor = 0.1  # 'step': lr multiplier at each milestone.

  c.total_steps = 1000  # Updates per group.
  # Gradient accumulation: each group's batch runs as this many pieces one
  # after another (activation memory of one piece; the same update).
  c.microbatches = 1
  # The gradient noise scale B_simple (McCandlish et al. 2018), the critical
  # batch size, logged every this many steps (noise_scale.py; one extra
  # forward and backward each); 0: off.
  c.noise_scale = ml_collections.ConfigDict()
  c.noise_scale.every = 0
  # Pieces the batch is cut into (>= 2, dividing the batch); 0: the group's
  # data devices (one piece each), at least 2.
  c.noise_scale.pieces = 0
  c.log_every = 50  # Train metrics to TensorBoard/JSONL and a progress line.
  c.eval_every = 500  # Validation eval; every eval split at the end.
  # Evaluate at most this many batches per split (0: all): for quick looks
  # at large splits; the log and the metrics say when an eval was capped.
  c.eval_max_batches = 0
  c.checkpoint_every = 500  # Own checkpoint (also saved at the end/SIGTERM).
  c.keep_checkpoints = 3  # Orbax max_to_keep; >= 3 so readers never race.
  c.init_checkpoint = ""  # Run dir or checkpoint dir to start params from.

  c.sharding = ml_collections.ConfigDict()
  # (regex over 'params/...' paths, 'replicate' | 'fsdp'); first match wins.
  c.sharding.rules = (("params/.*", "replicate"),)
  c.sharding.fsdp_min_size = 2**14  # Smaller parameters stay replicated.
  # Devices of each group's 'model' axis (tensor parallelism): a group's
  # mesh is ('data', 'model') = (devices / model_axis, model_axis), and
  # rules may name 'model' for a dimension (e.g. attention heads); 1 keeps a
  # 1-D 'data' mesh.
  c.sharding.model_axis = 1
  # Devices of one group (one program: groups of unequal size on one host;
  # set it per group below); 0: an equal share of the devices the groups
  # that name theirs leave.
  c.devices = 0

  # Groups that differ (docs/groups.md). `group.g<i>` holds only the fields
  # group i sets differently from the rest of this config: its model (name
  # and fields), batch size, devices, optimizer, alpha, burn-in, temperature,
  # exchange interval and teacher weighting (GROUP_FIELDS), e.g.
  # `c.group.g1.model.hidden_sizes = (32,)`, or on the command line
  # `--config.group.g1.model.hidden_sizes='(32,)'`. Group i's whole config is
  # `config_lib.group_config(config, i)`; the groups share the data, the task
  # and the output space.
  c.group = ml_collections.ConfigDict()

  # Codistillation (Anil et al. 2018): G copies exchange stale params.
  c.codistill = ml_collections.ConfigDict()
  c.codistill.num_groups = 1  # G; 1 (or alpha 0) is the sync baseline.
  # Where the teachers come from (teachers.SOURCES): 'peers', the other
  # groups (codistillation); 'checkpoint', classic two-phase distillation
  # from a trained teacher of any architecture; 'service', the same teacher
  # served by a pool of Ray workers (EDL-Dist, `pip install -e .[service]`);
  # 'stored', its targets written once by `codistill_jax.tools.store_targets`.
  c.codistill.teacher_source = "peers"
  # What peers do with each other's params at an exchange ('peers' only):
  # 'distill', codistillation (a loss towards the mean of their predictions);
  # 'average', periodic parameter averaging (local SGD / DiLoCo,
  # averaging.py): every exchange_every steps each group's params become an
  # outer optimizer's step on the groups' mean delta. Sync, codistillation
  # and averaging then differ in one field each (num_groups, this).
  c.codistill.method = "distill"
  c.codistill.averaging = ml_collections.ConfigDict()
  # True: every group waits for its peers' params of the same step (DiLoCo);
  # False: averages with the newest it holds, restored in the background.
  c.codistill.averaging.synchronous = True
  # One of averaging.OUTER_OPTIMIZERS: 'nesterov' (DiLoCo's), or 'sgd'
  # (with learning rate 1: plain averaging).
  c.codistill.averaging.outer_optimizer = "nesterov"
  c.codistill.averaging.outer_learning_rate = 0.7
  c.codistill.averaging.outer_momentum = 0.9  # 'nesterov' only.
  # Groups that come and go: average with the peers whose params of the step
  # arrive within `grace_s` of the group's own, once at least `quorum` of
  # the groups (itself included) are there; 0: all of them (DiLoCo).
  # `synchronous` only.
  c.codistill.averaging.quorum = 0
  c.codistill.averaging.grace_s = 30.0
  c.codistill.exchange_every = 50  # Steps between publish + reload of peers.
  c.codistill.exchange_dir = ""  # '' = the workdir; NFS or gs:// paths work.
  # How a published step is stored (exchange.FORMATS): 'blob', one object of
  # raw little-endian arrays with a header and checksums (the cheapest to
  # write and read); 'orbax', an Orbax checkpoint (what a group that spans
  # several processes needs); 'auto': blob unless the job has several
  # processes.
  c.codistill.exchange_format = "auto"
  # True: wait until published and reloaded at each exchange (deterministic
  # staleness, reproducible single-process runs); False: in the background.
  c.codistill.exchange_blocking = False
  # > 0: at an exchange, a group whose peer's newest published step is more
  # than this many steps behind waits for it (free-running processes then
  # distil from teachers of the intended age); 0: never wait.
  c.codistill.max_staleness = 0
  # Groups that may join a running run later (--groups=g with g up to this,
  # minus one; docs/groups.md); 0: only the num_groups started.
  c.codistill.max_groups = 0
  # What a group that joins a running run starts from (a group is never
  # restarted for it): 'scratch'; 'peer', the newest published params of a
  # peer of its architecture (scratch if there is none); with
  # `join_warmup_steps` > 0 it first learns from its peers alone (task loss
  # off) for that many steps.
  c.codistill.join_init = "scratch"
  c.codistill.join_warmup_steps = 0
  # How a group weighs its teachers (teachers.WEIGHTINGS): 'uniform';
  # 'freshness', 1 / (1 + staleness / exchange_every) (newer params count
  # more: peers that step at different speeds); 'val_loss', a softmax of
  # minus each peer's newest published validation loss over
  # `weighting_temperature` (better peers count more; uniform until each
  # has evaluated).
  c.codistill.teacher_weighting = "uniform"
  c.codistill.weighting_temperature = 0.1
  # A peer that publishes nothing newer for this long while a group waits
  # for it is taken as dead: the group goes on without it (and says so).
  c.codistill.peer_timeout_s = 300.0
  c.codistill.burn_in_steps = 0  # alpha = 0 before this step.
  c.codistill.alpha = 1.0  # Weight of the distillation term after burn-in.
  c.codistill.alpha_ramp_steps = 0  # Linear ramp of alpha after burn-in.
  c.codistill.temperature = 1.0  # T; 'kl'/'xent' are scaled by T^2.
  c.codistill.divergence = "kl"  # 'kl' | 'xent' (soft) | 'mse' (on logits).
  c.codistill.teacher_dtype = "float32"  # 'bfloat16' halves teacher memory.
  # 'checkpoint'/'service': a run dir, checkpoints dir or step dir.
  c.codistill.teacher_checkpoint = ""
  c.codistill.teacher_model_name = ""  # 'checkpoint': '' = model_name.
  c.codistill.teacher_model = ml_collections.ConfigDict()  # Its kwargs.
  # 'stored': the directory `python -m codistill_jax.tools.store_targets` wrote.
  c.codistill.stored_targets = ""
  # > 0: distil towards the teacher's top-k probabilities plus one tail
  # bucket with the rest of the mass (what the target store or the teacher
  # service sends); 0: the full distribution.
  c.codistill.topk = 0
  # 'tail' keeps the rest of the mass as a bucket; 'renormalize' rescales the
  # k probabilities to 1 and drops the tail: biased, for comparison only.
  c.codistill.topk_mode = "tail"

  # Importance-sampled distillation (Li et al. 2018) for large output spaces:
  # the output layers of student and teachers are evaluated on K sampled
  # classes (+ each position's label) only. Needs a model with `hidden` and
  # `output_embedding` (the Transformer LM), in-process teachers.
  c.codistill.sampled = ml_collections.ConfigDict()
  c.codistill.sampled.num_samples = 0  # K; 0 = full-softmax distillation.
  # 'dynamic' (ranked teacher-student disagreement, Li et al.), 'teacher'
  # (the teacher's probabilities), 'unigram' (train-split class counts),
  # 'uniform'.
  c.codistill.sampled.proposal = "dynamic"
  c.codistill.sampled.prior_mix = 0.5  # 'dynamic': weight of teacher prior.
  c.codistill.sampled.uniform_mix = 0.05  # Uniform floor, in (0, 1].
  # Positions of the batch whose full distributions shape the proposal.
  c.codistill.sampled.proposal_positions = 64
  # True: the task loss is the sampled softmax on the same classes (the full
  # output layer is never formed in training); False: exact task loss.
  c.codistill.sampled.task_loss = True

  # Teacher-inference service (teacher_source='service'): Ray workers serve
  # the teacher_checkpoint; the student's batches arrive with its targets.
  c.codistill.service = ml_collections.ConfigDict()
  # '' starts a local Ray cluster with every port on 127.0.0.1 and no
  # dashboard; else a running cluster's address ('auto', 'host:port').
  c.codistill.service.address = ""
  c.codistill.service.num_workers = 2  # Workers this run starts (0: none).
  c.codistill.service.worker_cpus = 1.0  # Ray CPUs each worker reserves.
  c.codistill.service.worker_gpus = 0.0  # Ray GPUs each worker reserves.
  c.codistill.service.in_flight = 4  # Batches sent ahead of the step.
  # A request unanswered this long is resent to another worker.
  c.codistill.service.request_timeout_s = 60.0
  c.codistill.service.retries = 3  # Resends of one batch before failing.
  # No live worker: 'wait' (up to wait_timeout_s, then stop with an error)
  # or 'fallback' (compute targets in this process until a worker joins).
  c.codistill.service.no_worker = "wait"
  c.codistill.service.wait_timeout_s = 120.0  # 'wait' (and worker start-up).
  # Workers send full probabilities, or with config.codistill.topk = k > 0
  # only the top k (the loss keeps the rest of the mass as a tail bucket).
  return c


# The range of every numeric field of `base_config()`, declared once: a
# comparison ('> 0', '>= 3') or an interval ('[0, 1)'). Tuple fields apply it
# to each entry. Model and data modules declare theirs as `RANGES` next to
# their own fields; `validate` reads all of them, and a test fails for a
# numeric field nobody gave a range.
RANGES = {
    "seed": "[0, 2**63)",
    "data.batch_size": "> 0",
    "data.eval_batch_size": "> 0",
    "data.prefetch": ">= -1",
    "data.split_seed": "[0, 2**63)",
    "optimizer.learning_rate": "> 0",
    "optimizer.warmup_steps": ">= 0",
    "optimizer.weight_decay": ">= 0",
    "optimizer.momentum": "[0, 1)",
    "optimizer.b1": "[0, 1)",
    "optimizer.b2": "[0, 1)",
    "optimizer.grad_clip_norm": ">= 0",
    "optimizer.milestones": "(0, 1)",
    "optimizer.decay_factor": "(0, 1]",
    "total_steps": "> 0",
    "microbatches": "> 0",
    "noise_scale.every": ">= 0",
    "noise_scale.pieces": ">= 0",
    "log_every": "> 0",
    "eval_every": "> 0",
    "eval_max_batches": ">= 0",
    "checkpoint_every": "> 0",
    "keep_checkpoints": ">= 3",
    "sharding.fsdp_min_size": ">= 0",
    "sharding.model_axis": "> 0",
    "codistill.num_groups": "> 0",
    "codistill.exchange_every": "> 0",
    "codistill.max_staleness": ">= 0",
    "codistill.max_groups": ">= 0",
    "codistill.join_warmup_steps": ">= 0",
    "codistill.weighting_temperature": "> 0",
    "codistill.averaging.quorum": ">= 0",
    "codistill.averaging.grace_s": ">= 0",
    "devices": ">= 0",
    "codistill.peer_timeout_s": "> 0",
    "codistill.averaging.outer_learning_rate": "> 0",
    "codistill.averaging.outer_momentum": "[0, 1)",
    "codistill.burn_in_steps": ">= 0",
    "codistill.alpha": ">= 0",
    "codistill.alpha_ramp_steps": ">= 0",
    # T = 100 already flattens any target to uniform within 1% of its logit
    # range; beyond that a value is a typo (a missing decimal point).
    "codistill.temperature": "(0, 100]",
    "codistill.topk": ">= 0",
    "codistill.sampled.num_samples": ">= 0",
    "codistill.sampled.prior_mix": "[0, 1]",
    "codistill.sampled.uniform_mix": "(0, 1]",
    "codistill.sampled.proposal_positions": "> 0",
    "codistill.service.num_workers": ">= 0",
    "codistill.service.worker_cpus": ">= 0",
    "codistill.service.worker_gpus": ">= 0",
    "codistill.service.in_flight": "> 0",
    "codistill.service.request_timeout_s": "> 0",
    "codistill.service.retries": ">= 0",
    "codistill.service.wait_timeout_s": "> 0",
}

# Sub-dicts whose keys belong to a plug-in (a model's fields, a data module's
# fields), not to the skeleton.
_OPEN = ("model", "data", "teacher_model", "group")


# ----------------------------------------------------------------------------
# Ranges.
# ----------------------------------------------------------------------------
_COMPARISON = re.compile(r"\s*(>=|>|<=|<)\s*([-+*.\w]+)\s*")
_INTERVAL = re.compile(
    r"\s*([\[(])\s*([-+*.\w]+)\s*,\s*([-+*.\w]+)\s*([\])])\s*")


def _number(text: str) -> float:
  if not re.fullmatch(r"[-+]?[\d.e]+(\*\*\d+)?|[-+]?inf", text):
    raise ValueError(f"bad number {text!r} in a range")
  base, _, power = text.partition("**")
  return float(base) ** int(power) if power else float(base)


def in_range(value: float, spec: str) -> bool:
  """Whether `value` lies in `spec` ('> 0', '>= 3', '[0, 1)', '(0, 2**63)')."""
  m = _COMPARISON.fullmatch(spec)
  if m:
    op, bound = m.group(1), _number(m.group(2))
    return {">": value > bound, ">=": value >= bound, "<": value < bound,
            "<=": value <= bound}[op]
  m = _INTERVAL.fullmatch(spec)
  if not m:
    raise ValueError(f"bad range {spec!r}")
  lo, hi = _number(m.group(2)), _number(m.group(3))
  above = value >= lo if m.group(1) == "[" else value > lo
  below = value <= hi if m.group(4) == "]" else value < hi
  return above and below


def _describe(spec: str) -> str:
  m = _COMPARISON.fullmatch(spec)
  if m:
    words = {">": "greater than", ">=": "at least", "<": "less than",
             "<=": "at most"}
    return f"{words[m.group(1)]} {m.group(2)}"
  return f"in {spec.replace(' ', '')}"


def check_choice(config, dotted: str, choices: Iterable[str]) -> None:
  """config.<dotted> is one of `choices` (the owner's tuple of names)."""
  value, choices = get_field(config, dotted), tuple(choices)
  if value not in choices:
    raise ConfigError(f"config.{dotted}={value!r} is unknown; use one of "
                      f"{choices}")


def check_ranges(node: Mapping[str, Any], ranges: Mapping[str, str],
                 prefix: str = "config") -> None:
  """Each numeric field named in `ranges` is finite and in its range.

  Args:
    node: a ConfigDict (or a sub-dict of one) holding the fields.
    ranges: dotted field name (relative to `node`) -> range spec.
    prefix: how `node` is named in messages, e.g. 'config.model'.
  """
  for name, spec in ranges.items():
    value = get_field(node, name)
    if value is _MISSING or value is None:
      continue  # Absent here, or None: the field's automatic default.
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and
            (isinstance(v, int) or math.isfinite(v)) and  # (ints of any
            in_range(v, spec))  # size: no float conversion.)
      if not ok:
        raise ConfigError(f"{prefix}.{name}={value!r} must be "
                          f"{'each ' if values is value else ''}"
                          f"{_describe(spec)}")


_MISSING = object()


def get_field(node: Mapping[str, Any], dotted: str) -> Any:
  """node['a']['b'] for 'a.b'; a sentinel when a part is missing."""
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return _MISSING
    node = node[part]
  return node


def numeric_fields(node: Mapping[str, Any], prefix: str = "") -> list[str]:
  """Dotted names of every int/float field (or tuple of them) under `node`."""
  out = []
  for k, v in node.items():
    name = f"{prefix}{k}"
    if hasattr(v, "keys"):
      out += numeric_fields(v, name + ".")
    elif _is_number(v) or (isinstance(v, (tuple, list)) and v and
                           all(_is_number(x) for x in v)):
      out.append(name)
  return out


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


# ----------------------------------------------------------------------------
# The skeleton: keys and types.
# ----------------------------------------------------------------------------
def check_like(name: str, value, default) -> None:
  """`value` must have the type of `default` (ints count as floats)."""
  if default is None or callable(default) and not isinstance(default, type):
    return
  if isinstance(default, (tuple, list)):
    if not isinstance(value, (tuple, list)):
      raise ConfigError(f"{name}={value!r} must be a tuple like {default!r}")
    for v in value:
      for d in default[:1]:
        if isinstance(d, (tuple, list)):  # Records (e.g. rules): their
          if not isinstance(v, (tuple, list)):  # owner checks the fields.
            raise ConfigError(f"{name}={value!r} must be a tuple of tuples "
                              f"like {default!r}")
        else:
          check_like(name, v, d)
    return
  kinds = (int, float) if isinstance(default, float) else (type(default),)
  if isinstance(default, (int, float, str, bool)) and (
      not isinstance(value, kinds) or
      isinstance(value, bool) != isinstance(default, bool)):
    raise ConfigError(f"{name}={value!r} must be a {type(default).__name__} "
                      f"like the default {default!r}")


def _check_skeleton(config, reference, prefix="config") -> None:
  """Same keys as the base config, recursively, with the defaults' types."""
  missing = sorted(set(reference) - set(config))
  extra = sorted(set(config) - set(reference))
  if missing:
    raise ConfigError(f"{prefix} is missing field(s) {missing}; start the "
                      "config from config_lib.base_config()")
  if extra and prefix.rsplit(".", 1)[-1] not in ("data",):
    raise ConfigError(f"{prefix} has unknown field(s) {extra}; known: "
                      f"{sorted(reference)}")
  for k, v in reference.items():
    name = f"{prefix}.{k}"
    if isinstance(v, ml_collections.ConfigDict):
      if not hasattr(config[k], "keys"):
        raise ConfigError(f"{name} must be a ConfigDict, not {config[k]!r}")
      if k in ("model", "teacher_model", "group"):
        continue  # The model module (check_groups) checks these fields.
      _check_skeleton(config[k], v, name)
    else:
      check_like(name, config[k], v)


def check_skeleton(config: ml_collections.ConfigDict) -> None:
  """Keys, types and ranges of the base config's fields (no jax needed)."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"the config must be a ConfigDict, not "
                      f"{type(config).__name__}; start it from "
                      "config_lib.base_config()")
  _check_skeleton(config, base_config())
  check_ranges(config, RANGES)
  for name, package in (("model_name", "models"), ("data.name", "data")):
    if not get_field(config, name):
      raise ConfigError(f"config.{name} is empty; name a module of "
                        f"codistill_jax/{package}/ or a dotted module path "
                        "of your own")


# ----------------------------------------------------------------------------
# Loading config files.
# ----------------------------------------------------------------------------
def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config file's `:arg` strictly: 'quick,groups=2' -> ConfigDict.

  A bare name sets a bool default to True; `key=value` is converted to the
  default's type. Unknown names raise ConfigError listing the known ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ConfigError(f"config arg {key!r} is unknown; known: "
                        f"{sorted(defaults)}")
    kind = type(defaults[key])
    if not value:
      if kind is not bool:
        raise ConfigError(f"config arg {key!r} needs a value: {key}=...")
      out[key] = True
    elif kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        raise ConfigError(f"config arg {key}={value!r} is not a "
                          f"{kind.__name__}") from None
  return out


def load_module(path: str, name: str | None = None):
  """Executes the Python file at `path` as a module; ConfigError if it can't.

  Args:
    path: a config (or sweep) file.
    name: the module's name (default: derived from the file name).
  """
  if not path:
    raise ConfigError("--config is empty; e.g. --config=configs/flights.py")
  if not os.path.isfile(path):
    raise ConfigError(f"--config could not be loaded: {path}: no such file")
  if not path.endswith(".py"):
    raise ConfigError(f"--config could not be loaded: {path} is not a .py "
                      "file; a config is a Python file defining "
                      "get_config(arg=None)")
  name = name or "config_" + re.sub(r"\W", "_", os.path.basename(path)[:-3])
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except ConfigError:
    raise
  except SyntaxError as e:
    raise ConfigError(f"--config could not be loaded: {path} is not valid "
                      f"Python (line {e.lineno}: {e.msg})") from None
  except ImportError as e:
    raise ConfigError(f"--config could not be loaded: {path} imports a "
                      f"module that is missing ({e}); install it or fix the "
                      "import") from None
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"--config could not be loaded: {path} raised "
                      f"{type(e).__name__}: {_one_line(e)}") from None
  return module


def load_file(path_and_arg: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of 'file.py[:arg]', unlocked, or a ConfigError."""
  path, _, arg = path_and_arg.partition(":")
  module = load_module(path)
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(f"--config could not be loaded: {path} defines no "
                      "get_config(arg=None)")
  try:
    config = get_config(arg) if arg else get_config()
  except ConfigError as e:
    raise ConfigError(f"--config={path_and_arg}: {e}") from None
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"--config={path_and_arg}: get_config raised "
                      f"{type(e).__name__}: {_one_line(e)}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"--config={path_and_arg}: get_config returned "
                      f"{type(config).__name__}, not a ConfigDict; start it "
                      "from config_lib.base_config() and return it")
  return config


def parse_value(text: str, like: Any) -> Any:
  """A command-line string as a value of the type of `like`."""
  if isinstance(like, bool):
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
      raise ValueError(f"{text!r} is not a bool")
    return text.lower() in ("true", "1", "yes")
  if isinstance(like, (int, float)) or isinstance(like, (tuple, list)):
    import ast  # pylint: disable=g-import-not-at-top
    value = ast.literal_eval(text)
    if isinstance(value, bool) and not isinstance(like, (tuple, list)):
      raise ValueError(f"{text!r} is a bool, not a number")
    # (OverflowError for an int past a float's range.)
    return float(value) if isinstance(like, float) and isinstance(
        value, int) else value
  return text


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any] | Iterable[str]) -> None:
  """Sets dotted fields: {'a.b': 1} or ['a.b=1', ...] (strings are parsed).

  Only existing fields may be set (a typo is a ConfigError naming it).
  """
  items = (overrides.items() if isinstance(overrides, Mapping) else
           (o.partition("=")[::2] for o in overrides))
  for dotted, value in items:
    dotted = dotted.removeprefix("--").removeprefix("config.")
    if dotted.startswith(GROUP_PREFIX):
      set_group_field(config, dotted, value)
      continue
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
      if not hasattr(node, "keys") or part not in node:
        raise ConfigError(f"unknown config field {dotted!r}")
      node = node[part]
    if not hasattr(node, "keys") or leaf not in node:
      raise ConfigError(f"unknown config field {dotted!r}")
    old = node[leaf]
    if isinstance(value, str) and not isinstance(old, str):
      try:
        value = parse_value(value, old)
      except (ValueError, SyntaxError, TypeError, OverflowError,
              RecursionError):  # What literal_eval and float() raise.
        raise ConfigError(f"config.{dotted}={value!r} is not a "
                          f"{type(old).__name__}") from None
    try:
      with node.ignore_type() if isinstance(old, (tuple, list)) else _nothing():
        node[leaf] = value
    except (TypeError, OverflowError) as e:  # (An int past a float's range.)
      raise ConfigError(f"config.{dotted}={value!r}: {_one_line(e)}") from None


class _nothing:  # pylint: disable=invalid-name
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def load(path_and_arg: str, overrides: Mapping[str, Any] | Iterable[str] = (),
         lock: bool = True) -> ml_collections.ConfigDict:
  """The one config loader: 'configs/x.py[:arg]' plus dotted overrides.

  Args:
    path_and_arg: a config file, optionally with ':arg' for get_config.
    overrides: {'a.b': value} or ['a.b=value'] (as `--config.a.b=value`).
    lock: lock the result (new fields then raise), as the CLI does.

  Returns:
    The ConfigDict. Raises ConfigError for a file that does not load or an
    override that names no field.
  """
  config = load_file(path_and_arg)
  apply_overrides(config, overrides)
  if lock:
    config.lock()
  return config


# ----------------------------------------------------------------------------
# Groups that differ: `config.group.g<i>` (docs/groups.md).
# ----------------------------------------------------------------------------
# What a group may set differently: a field, or every field under a sub-dict.
# The rest (data, task loss, steps, the exchange's place and format, the
# method) is one setting of the whole run.
GROUP_FIELDS = ("model_name", "model", "data.batch_size", "devices",
                "optimizer", "microbatches", "sharding.model_axis",
                "codistill.alpha", "codistill.burn_in_steps",
                "codistill.alpha_ramp_steps", "codistill.temperature",
                "codistill.exchange_every", "codistill.teacher_weighting",
                "codistill.weighting_temperature", "codistill.teacher_dtype")
_GROUP_KEY = re.compile(r"g(0|[1-9][0-9]*)")
GROUP_PREFIX = "group."


def group_key(group: int) -> str:
  """The name of group `group`'s entry in `config.group` ('g1')."""
  return f"g{group}"


def flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a.b': leaf} of a nested ConfigDict (or dict)."""
  out = {}
  for k, v in node.items():
    if hasattr(v, "keys"):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def group_overrides(config, group: int) -> dict[str, Any]:
  """{dotted field: value} that group `group` sets differently ({} if none)."""
  entry = config.group.get(group_key(group)) if "group" in config else None
  return flatten(entry) if entry else {}


def set_groups(config) -> list[int]:
  """The groups that set fields of their own (`config.group` entries)."""
  return sorted(int(k[1:]) for k in config.get("group", {})
                if _GROUP_KEY.fullmatch(k))


def max_groups(config) -> int:
  """Groups a run may ever have: those started and those that may join."""
  cd = config.codistill
  return max(cd.num_groups, cd.max_groups)


def group_config(config: ml_collections.ConfigDict,
                 group: int) -> ml_collections.ConfigDict:
  """Group `group`'s whole config: `config` with its `group.g<i>` fields.

  A group that sets nothing gets `config` itself. A group that names another
  `model_name` starts its model fields from empty (another model's fields
  mean nothing to it); otherwise its model fields update the shared ones.
  The result's `group` table is empty: it is the config of one group.
  """
  over = group_overrides(config, group)
  if not over:
    return config
  c = ml_collections.ConfigDict(config.to_dict())
  c.group = ml_collections.ConfigDict()
  if over.get("model_name", config.model_name) != config.model_name:
    c.model = ml_collections.ConfigDict()
  for dotted, value in over.items():
    _set(c, dotted, value, create=dotted.startswith("model."))
  c.lock()
  return c


def _set(config, dotted: str, value, create: bool = False) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents:
    if part not in node:
      if not create:
        raise ConfigError(f"unknown config field {dotted!r}")
      node[part] = ml_collections.ConfigDict()
    node = node[part]
  if leaf not in node and not create:
    raise ConfigError(f"unknown config field {dotted!r}")
  with node.ignore_type():
    node[leaf] = value


def set_group_field(config: ml_collections.ConfigDict, dotted: str,
                    value) -> None:
  """Sets 'group.g<i>.<field>' = value, creating the entry (unlocked config).

  A string `value` is parsed like the shared field's type (a model field
  the shared model does not have: as a Python literal, else kept a string).
  """
  rest = dotted[len(GROUP_PREFIX):]
  key, _, field = rest.partition(".")
  if not _GROUP_KEY.fullmatch(key) or not field:
    raise ConfigError(f"config.{dotted}: name a group's field as "
                      "group.g<index>.<field>, e.g. group.g1.model_name")
  if isinstance(value, str):
    like = get_field(config, field)
    try:
      if like is _MISSING or like is None:
        import ast  # pylint: disable=g-import-not-at-top
        try:
          value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
          pass  # A plain string (a model name, a dtype).
      elif not isinstance(like, str):
        value = parse_value(value, like)
    except (ValueError, SyntaxError, TypeError, OverflowError,
            RecursionError):
      raise ConfigError(f"config.{dotted}={value!r} is not a "
                        f"{type(like).__name__}") from None
  with config.unlocked() if config.is_locked else _nothing():
    if key not in config.group:
      config.group[key] = ml_collections.ConfigDict()
    _set(config.group[key], field, value, create=True)


def group_error(config, group: int, e: Exception) -> ConfigError:
  """A ConfigError of group `group`'s own config, said of the run's: the
  field the group set is named where it is (`config.group.g1.model.x=`),
  anything else is prefixed with the group."""
  msg, key = str(e), group_key(group)
  for dotted in sorted(group_overrides(config, group), key=len, reverse=True):
    if re.search(rf"config\.{re.escape(dotted)}\b(?!\.)", msg):
      return ConfigError(re.sub(rf"config\.{re.escape(dotted)}\b(?!\.)",
                                f"config.group.{key}.{dotted}", msg, count=1))
  return ConfigError(f"group {group} (config.group.{key}): {msg}")


def check_groups(config) -> None:
  """The `config.group` table: entries g<i> of groups the run may have, of
  fields a group may set (GROUP_FIELDS) that exist (no jax)."""
  n, top = config.codistill.num_groups, max_groups(config)
  base = base_config()
  for key, entry in config.group.items():
    m = _GROUP_KEY.fullmatch(key)
    if not m:
      raise ConfigError(f"config.group.{key}: a group's entry is named "
                        "g<index> (g0, g1, ...)")
    g = int(m.group(1))
    if g >= top:
      raise ConfigError(
          f"config.group.{key}: there is no group {g}: the run has groups "
          f"0..{n - 1} (config.codistill.num_groups={n}); raise "
          f"config.codistill.max_groups to let group {g} join")
    if not hasattr(entry, "keys"):
      raise ConfigError(f"config.group.{key}={entry!r} must be a ConfigDict "
                        f"of the fields group {g} sets differently")
    for dotted in flatten(entry):
      if not any(dotted == f or dotted.startswith(f + ".")
                 for f in GROUP_FIELDS):
        why = ("the groups share their data, task and output space"
               if dotted.split(".")[0] in ("data", "loss") else
               "it is one setting of the whole run")
        raise ConfigError(
            f"config.group.{key}.{dotted}: a group cannot set this field "
            f"({why}); a group may set {', '.join(GROUP_FIELDS)}")
      if not dotted.startswith("model.") and get_field(base,
                                                       dotted) is _MISSING:
        raise ConfigError(f"config.group.{key}.{dotted} is not a config "
                          "field; check the spelling")


def config_path(name: str) -> str:
  """configs/<name>.py of this repository (for tests and experiments)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(root, "configs", f"{name}.py")


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())[:300]


def module_exists(dotted: str) -> bool:
  """Whether `dotted` names an importable module (without importing it)."""
  try:
    return importlib.util.find_spec(dotted) is not None
  except (ImportError, ValueError):
    return False


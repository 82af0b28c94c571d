"""The common config skeleton and its validation.

Workload configs in `configs/` start from `base_config()` and fill in the model
and data. `validate(config)` runs before anything is compiled or written and
raises `ConfigError` with a one-line message that names the field and the fix.
"""

import dataclasses
import math
import os

import jax
import ml_collections

from codistill_jax import data as data_lib
from codistill_jax import losses
from codistill_jax import mesh as mesh_lib
from codistill_jax import models as models_lib
from codistill_jax import optim
from codistill_jax.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
  """Fields every experiment has, with defaults; workload configs extend it."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Init and data-order seed of the run (retrains differ in it).
  c.model_name = ""  # Module in codistill_jax/models/.
  c.model = ml_collections.ConfigDict()  # kwargs of that module's Model.
  c.loss = "softmax_xent"  # Task loss: one of losses.TASK_LOSSES.

  c.data = ml_collections.ConfigDict()
  c.data.name = ""  # Module in codistill_jax/data/.
  c.data.batch_size = 128  # Global batch of one group (all its devices).
  c.data.eval_batch_size = 256  # Global eval batch; the last one is padded.
  c.data.split_seed = 0  # Fixed seed of the train/validation/test split.
  c.data.partition = "disjoint"  # 'disjoint' shards per group, or 'shared'.

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
  c.log_every = 50  # Train metrics to TensorBoard/JSONL and a progress line.
  c.eval_every = 500  # Validation eval; test is evaluated at the end.
  c.checkpoint_every = 500  # Own checkpoint (also saved at the end/SIGTERM).
  c.keep_checkpoints = 3  # Orbax max_to_keep; >= 3 so readers never race.
  c.init_checkpoint = ""  # Run dir or checkpoint dir to start params from.

  c.sharding = ml_collections.ConfigDict()
  # (regex over 'params/...' paths, 'replicate' | 'fsdp'); first match wins.
  c.sharding.rules = (("params/.*", "replicate"),)
  c.sharding.fsdp_min_size = 2**14  # Smaller parameters stay replicated.

  # Codistillation (Anil et al. 2018): G copies exchange stale params.
  c.codistill = ml_collections.ConfigDict()
  c.codistill.num_groups = 1  # G; 1 (or alpha 0) is the sync baseline.
  # 'peers': distil towards the other groups (codistillation); 'checkpoint':
  # classic two-phase distillation from a trained teacher of any architecture.
  c.codistill.teacher_source = "peers"
  c.codistill.exchange_every = 50  # Steps between publish + reload of peers.
  c.codistill.exchange_dir = ""  # '' = the workdir; NFS or gs:// paths work.
  # True: wait until published and reloaded at each exchange (deterministic
  # staleness, reproducible single-process runs); False: in the background.
  c.codistill.exchange_blocking = False
  c.codistill.burn_in_steps = 0  # alpha = 0 before this step.
  c.codistill.alpha = 1.0  # Weight of the distillation term after burn-in.
  c.codistill.alpha_ramp_steps = 0  # Linear ramp of alpha after burn-in.
  c.codistill.temperature = 1.0  # T; 'kl'/'xent' are scaled by T^2.
  c.codistill.divergence = "kl"  # 'kl' | 'xent' (soft) | 'mse' (on logits).
  c.codistill.teacher_dtype = "float32"  # 'bfloat16' halves teacher memory.
  c.codistill.teacher_checkpoint = ""  # 'checkpoint': a run or step dir.
  c.codistill.teacher_model_name = ""  # 'checkpoint': '' = model_name.
  c.codistill.teacher_model = ml_collections.ConfigDict()  # Its kwargs.
  return c


def _check_positive(config, *names):
  for name in names:
    value = config
    for part in name.split("."):
      value = value[part]
    if not isinstance(value, int) or value <= 0:
      raise ConfigError(f"config.{name}={value!r} must be a positive integer")


def _check_keys(config, reference, prefix="config"):
  """Same keys as the base config, recursively (catches typos in files)."""
  missing = sorted(set(reference) - set(config))
  extra = sorted(set(config) - set(reference))
  if missing:
    raise ConfigError(f"{prefix} is missing field(s) {missing}; start the "
                      "config from config_lib.base_config()")
  if extra:
    raise ConfigError(f"{prefix} has unknown field(s) {extra}; known: "
                      f"{sorted(reference)}")
  for k, v in reference.items():
    if isinstance(v, ml_collections.ConfigDict) and k not in (
        "model", "data", "teacher_model"):
      _check_keys(config[k], v, f"{prefix}.{k}")


def _check_codistill(cd: ml_collections.ConfigDict) -> None:
  if cd.teacher_source not in ("peers", "checkpoint"):
    raise ConfigError(f"config.codistill.teacher_source={cd.teacher_source!r} "
                      "must be 'peers' or 'checkpoint'")
  if cd.divergence not in losses.DIVERGENCES:
    raise ConfigError(f"config.codistill.divergence={cd.divergence!r} is "
                      f"unknown; use one of {losses.DIVERGENCES}")
  if cd.teacher_dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.codistill.teacher_dtype={cd.teacher_dtype!r} "
                      "must be 'float32' or 'bfloat16'")
  for name in ("alpha", "temperature"):
    value = cd[name]
    if not (isinstance(value, (int, float)) and math.isfinite(value) and
            value >= 0 and (value > 0 or name == "alpha")):
      raise ConfigError(f"config.codistill.{name}={value!r} must be a finite "
                        f"{'non-negative' if name == 'alpha' else 'positive'} "
                        "number")
  if cd.burn_in_steps < 0 or cd.alpha_ramp_steps < 0:
    raise ConfigError("config.codistill.burn_in_steps and alpha_ramp_steps "
                      "must be >= 0")
  if cd.teacher_source == "checkpoint" and not cd.teacher_checkpoint:
    raise ConfigError("config.codistill.teacher_source='checkpoint' needs "
                      "config.codistill.teacher_checkpoint=<run dir>")
  if cd.teacher_checkpoint and "://" not in cd.teacher_checkpoint and (
      not os.path.exists(cd.teacher_checkpoint)):
    raise ConfigError(f"config.codistill.teacher_checkpoint="
                      f"{cd.teacher_checkpoint}: no such directory")


def _check_like(name: str, value, default) -> None:
  """`value` must have the type of `default` (ints count as floats)."""
  if default is None or callable(default) and not isinstance(default, type):
    return
  if isinstance(default, (tuple, list)):
    if not isinstance(value, (tuple, list)):
      raise ConfigError(f"{name}={value!r} must be a tuple like {default!r}")
    for v in value:
      for d in default[:1]:
        _check_like(name, v, d)
    return
  kinds = (int, float) if isinstance(default, float) else (type(default),)
  if isinstance(default, (int, float, str, bool)) and (
      not isinstance(value, kinds) or
      isinstance(value, bool) != isinstance(default, bool)):
    raise ConfigError(f"{name}={value!r} must be a {type(default).__name__} "
                      f"like the default {default!r}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             num_groups_here: int | None = None):
  """Raises ConfigError naming the first problem; returns None if all is well.

  Args:
    config: the experiment config.
    num_devices: devices of this job (default: jax.device_count()).
    num_groups_here: groups this job runs (default: all of them).
  """
  _check_keys(config, base_config())
  for k in base_config().data:
    if k not in config.data:
      raise ConfigError(f"config.data is missing field {k!r}")
  _check_positive(config, "total_steps", "log_every", "eval_every",
                  "checkpoint_every", "codistill.num_groups",
                  "codistill.exchange_every", "data.batch_size",
                  "data.eval_batch_size")
  _check_codistill(config.codistill)
  if config.keep_checkpoints < 3:
    raise ConfigError(f"config.keep_checkpoints={config.keep_checkpoints} must "
                      "be >= 3 so that a reader never loses a step it restores")
  if config.loss not in losses.TASK_LOSSES:
    raise ConfigError(f"config.loss={config.loss!r} is unknown; use one of "
                      f"{losses.TASK_LOSSES}")
  if config.optimizer.name not in optim.OPTIMIZERS:
    raise ConfigError(f"config.optimizer.name={config.optimizer.name!r} is "
                      f"unknown; use one of {optim.OPTIMIZERS}")
  if config.optimizer.schedule not in optim.SCHEDULES:
    raise ConfigError(f"config.optimizer.schedule={config.optimizer.schedule!r}"
                      f" is unknown; use one of {optim.SCHEDULES}")
  lr = config.optimizer.learning_rate
  if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
    raise ConfigError(f"config.optimizer.learning_rate={lr!r} must be a "
                      "positive finite number")
  if config.data.partition not in ("disjoint", "shared"):
    raise ConfigError(f"config.data.partition={config.data.partition!r} must "
                      "be 'disjoint' or 'shared'")
  mesh_lib.check_rules(config.sharding.rules)

  # Model and data modules exist, and the model takes the configured fields.
  model_cls = models_lib.get_module(config.model_name).Model
  fields = {f.name for f in dataclasses.fields(model_cls)} - {"parent", "name"}
  unknown = sorted(set(config.model) - fields)
  if unknown:
    raise ConfigError(f"config.model has unknown field(s) {unknown} for model "
                      f"{config.model_name!r}; valid: {sorted(fields)}")
  for f in dataclasses.fields(model_cls):
    if f.name in config.model and f.default is not dataclasses.MISSING:
      _check_like(f"config.model.{f.name}", config.model[f.name], f.default)
  data_module = data_lib.get_module(config.data.name)

  # Divisibility: groups over devices, batches over a group's devices.
  num_devices = num_devices or jax.device_count()
  groups_here = num_groups_here or config.codistill.num_groups
  if num_devices % groups_here:
    raise ConfigError(
        f"config.codistill.num_groups={config.codistill.num_groups} does not "
        f"divide the {num_devices} devices; use a divisor of {num_devices}")
  per_group = num_devices // groups_here
  for name in ("batch_size", "eval_batch_size"):
    value = config.data[name]
    if value % per_group:
      raise ConfigError(
          f"config.data.{name}={value} is not divisible by the {per_group} "
          f"devices of a group; use a multiple of {per_group}")
  if hasattr(data_module, "check"):
    data_module.check(config)


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

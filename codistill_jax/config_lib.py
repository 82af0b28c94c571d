"""The common config skeleton and its validation.

Workload configs in `configs/` start from `base_config()` and fill in the model
and data. `validate(config)` runs before anything is compiled or written and
raises `ConfigError` with a one-line message that names the field and the fix.
"""

import dataclasses
import importlib.util
import math
import os

import jax
import ml_collections

from codistill_jax import data as data_lib
from codistill_jax import losses
from codistill_jax import mesh as mesh_lib
from codistill_jax import models as models_lib
from codistill_jax import optim
from codistill_jax import sampling
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
  # classic two-phase distillation from a trained teacher of any architecture;
  # 'service': the same teacher served by a pool of Ray workers (EDL-Dist,
  # `pip install -e .[service]`; settings in codistill.service below).
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
  # > 0: distil towards the teacher's top-k probabilities plus one tail
  # bucket with the rest of the mass (what a sparse target store or the
  # teacher service sends); 0: the full distribution.
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
  if cd.teacher_source not in ("peers", "checkpoint", "service"):
    raise ConfigError(f"config.codistill.teacher_source={cd.teacher_source!r} "
                      "must be 'peers', 'checkpoint' or 'service'")
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
  if cd.teacher_source in ("checkpoint", "service") and (
      not cd.teacher_checkpoint):
    raise ConfigError(f"config.codistill.teacher_source={cd.teacher_source!r} "
                      "needs config.codistill.teacher_checkpoint=<run dir>")
  if cd.teacher_checkpoint and "://" not in cd.teacher_checkpoint and (
      not os.path.exists(cd.teacher_checkpoint)):
    raise ConfigError(f"config.codistill.teacher_checkpoint="
                      f"{cd.teacher_checkpoint}: no such directory")


def _check_init_checkpoint(path: str) -> None:
  if path and "://" not in path and not os.path.exists(path):
    raise ConfigError(f"config.init_checkpoint={path}: no such directory; "
                      "point it at a run's workdir or a step dir, or set ''")


def _check_service(config: ml_collections.ConfigDict) -> None:
  """config.codistill.service, when teacher_source='service'."""
  if config.codistill.teacher_source != "service":
    return
  if importlib.util.find_spec("ray") is None:
    raise ConfigError("config.codistill.teacher_source='service' needs Ray: "
                      "pip install -e .[service]")
  s, name = config.codistill.service, "config.codistill.service"
  if not isinstance(s.address, str):
    raise ConfigError(f"{name}.address={s.address!r} must be a string ('' = "
                      "a local cluster on loopback)")
  for field, minimum in (("num_workers", 0), ("in_flight", 1),
                         ("retries", 0)):
    value = s[field]
    if not isinstance(value, int) or isinstance(value, bool) or (
        value < minimum):
      raise ConfigError(f"{name}.{field}={value!r} must be an integer >= "
                        f"{minimum}")
  for field, positive in (("worker_cpus", False), ("worker_gpus", False),
                          ("request_timeout_s", True),
                          ("wait_timeout_s", True)):
    value = s[field]
    if not (isinstance(value, (int, float)) and math.isfinite(value) and
            (value > 0 if positive else value >= 0)):
      raise ConfigError(f"{name}.{field}={value!r} must be a finite "
                        f"{'positive' if positive else 'non-negative'} number")
  if s.no_worker not in ("wait", "fallback"):
    raise ConfigError(f"{name}.no_worker={s.no_worker!r} must be 'wait' or "
                      "'fallback'")
  if config.codistill.divergence not in ("kl", "xent"):
    raise ConfigError(f"config.codistill.divergence="
                      f"{config.codistill.divergence!r}: the service sends "
                      "probabilities, not logits; use 'kl' or 'xent'")


def _check_sparse(config: ml_collections.ConfigDict) -> None:
  """config.codistill.topk and config.codistill.sampled."""
  cd, sm = config.codistill, config.codistill.sampled
  name = "config.codistill.sampled"
  if not isinstance(cd.topk, int) or cd.topk < 0:
    raise ConfigError(f"config.codistill.topk={cd.topk!r} must be an integer "
                      ">= 0 (0 = full teacher distributions)")
  if cd.topk_mode not in sampling.TOPK_MODES:
    raise ConfigError(f"config.codistill.topk_mode={cd.topk_mode!r} must be "
                      f"one of {sampling.TOPK_MODES}")
  if cd.topk and config.loss != "softmax_xent":
    raise ConfigError(f"config.codistill.topk={cd.topk} needs a softmax model "
                      "(config.loss='softmax_xent'); use 0")
  if not isinstance(sm.num_samples, int) or sm.num_samples < 0:
    raise ConfigError(f"{name}.num_samples={sm.num_samples!r} must be an "
                      "integer >= 0 (0 = full-softmax distillation)")
  if not sm.num_samples:
    return
  vocab = config.data.get("vocab_size")
  if isinstance(vocab, int) and sm.num_samples > vocab:
    raise ConfigError(f"{name}.num_samples={sm.num_samples} exceeds "
                      f"config.data.vocab_size={vocab}; use at most {vocab}")
  if sm.proposal not in sampling.PROPOSALS:
    raise ConfigError(f"{name}.proposal={sm.proposal!r} must be one of "
                      f"{sampling.PROPOSALS}")
  if not 0 <= sm.prior_mix <= 1 or not 0 < sm.uniform_mix <= 1:
    raise ConfigError(f"{name}.prior_mix={sm.prior_mix} must be in [0, 1] "
                      f"and uniform_mix={sm.uniform_mix} in (0, 1] (a class "
                      "with no proposal mass would bias the estimate)")
  if not isinstance(sm.proposal_positions, int) or sm.proposal_positions < 1:
    raise ConfigError(f"{name}.proposal_positions={sm.proposal_positions!r} "
                      "must be a positive integer")
  problem = (
      "config.loss must be 'softmax_xent'" if config.loss != "softmax_xent"
      else "config.codistill.topk must be 0" if cd.topk
      else "config.codistill.divergence must be 'kl' or 'xent'"
      if cd.divergence not in ("kl", "xent")
      else "the teacher service sends probabilities, not hidden states; use "
      "config.codistill.topk" if cd.teacher_source == "service" else None)
  if problem:
    raise ConfigError(f"{name}.num_samples={sm.num_samples}: {problem} (or set "
                      "num_samples=0)")
  names = [("config.model_name", config.model_name)]
  if cd.teacher_source == "checkpoint" and cd.teacher_model_name:
    names.append(("config.codistill.teacher_model_name",
                  cd.teacher_model_name))
  for field, model_name in names:
    cls = models_lib.get_module(model_name).Model
    if not (hasattr(cls, "hidden") and hasattr(cls, "output_embedding")):
      raise ConfigError(f"{name}.num_samples={sm.num_samples}: {field}="
                        f"{model_name!r} exposes no hidden/output_embedding "
                        "(a sampled output layer); use num_samples=0")


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
  _check_init_checkpoint(config.init_checkpoint)
  _check_service(config)
  _check_sparse(config)
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

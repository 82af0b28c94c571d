"""Optimizers and learning-rate schedules built from `config.optimizer`."""

import ml_collections
import optax

from codistill_jax import config_lib
from codistill_jax.errors import ConfigError

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear", "step")


def check_config(config: ml_collections.ConfigDict) -> None:
  """config.optimizer names a known optimizer and schedule, and fits the run.

  The numeric ranges (lr > 0, betas in [0, 1), ...) are in config_lib.RANGES.
  """
  o = config.optimizer
  config_lib.check_choice(config, "optimizer.name", OPTIMIZERS)
  config_lib.check_choice(config, "optimizer.schedule", SCHEDULES)
  if o.warmup_steps >= config.total_steps:
    raise ConfigError(f"config.optimizer.warmup_steps={o.warmup_steps} is not "
                      f"shorter than config.total_steps={config.total_steps}: "
                      "the run would end before the learning rate peaks; use "
                      "fewer warm-up steps")


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int):
  """Warm-up (linear from 0) followed by the named decay."""
  lr, warmup = cfg.learning_rate, cfg.warmup_steps
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == "constant":
    decay = optax.constant_schedule(lr)
  elif cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(lr, 0.0, decay_steps)
  elif cfg.schedule == "step":
    # Multiply by `decay_factor` at each fraction of training in `milestones`.
    bounds = {int(f * total_steps) - warmup: cfg.decay_factor
              for f in cfg.milestones}
    decay = optax.piecewise_constant_schedule(lr, bounds)
  else:
    raise ConfigError(f"config.optimizer.schedule={cfg.schedule!r} is unknown; "
                      f"use one of {SCHEDULES}")
  if not warmup:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int):
  """Returns (tx, schedule) for `config.optimizer`."""
  schedule = make_schedule(cfg, total_steps)
  if cfg.name == "sgd":
    opt = optax.sgd(schedule)
  elif cfg.name == "momentum":
    opt = optax.sgd(schedule, momentum=cfg.momentum, nesterov=True)
  elif cfg.name == "adam":
    opt = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2)
  elif cfg.name == "adamw":
    opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2,
                      weight_decay=cfg.weight_decay)
  else:
    raise ConfigError(f"config.optimizer.name={cfg.name!r} is unknown; "
                      f"use one of {OPTIMIZERS}")
  chain = []
  if cfg.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  # Coupled L2 for the SGD family (decoupled decay is built into adamw).
  if cfg.name != "adamw" and cfg.weight_decay:
    chain.append(optax.add_decayed_weights(cfg.weight_decay))
  chain.append(opt)
  return optax.chain(*chain), schedule

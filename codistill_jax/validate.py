"""Validation of a whole config, before anything is compiled or written.

`validate(config)` raises `ConfigError` with a one-line message naming the
first bad field and the fix. It composes the checks of every owner of config
fields: the skeleton's keys, types and ranges (`config_lib`), then each
owner's `check_config` for its own fields (teacher source, checkpoints,
sampled distillation, losses, optimizer, model, data module, mesh). The owners
never import this module; it sits above them.
"""

from codistill_jax import checkpoint
from codistill_jax import config_lib
from codistill_jax import data
from codistill_jax import losses
from codistill_jax import mesh
from codistill_jax import models
from codistill_jax import noise_scale
from codistill_jax import optim
from codistill_jax import sampling
from codistill_jax import teachers
from codistill_jax.errors import ConfigError

# Owners checked in this order: a message names the first problem found.
_CHECKS = (teachers.check_config, checkpoint.check_config,
           sampling.check_config, losses.check_config, optim.check_config,
           noise_scale.check_config, models.check_config, data.check_config)


def validate(config, num_devices: int | None = None,
             num_groups_here: int | None = None,
             groups=None) -> None:
  """Raises ConfigError naming the first problem; returns None if all is well.

  `num_devices`, `num_groups_here` and `groups` describe the job the config
  runs in (default: every visible device, every group started);
  `mesh.check_config` checks the groups and batches against them. Each group
  that sets fields of its own (`config.group.g<i>`) is checked whole, as the
  config of that group, and named in the message.
  """
  config_lib.check_skeleton(config)
  config_lib.check_groups(config)
  for check in _CHECKS:
    check(config)
  for g in config_lib.set_groups(config):  # (Indices checked above.)
    own = config_lib.group_config(config, g)
    if own is config:
      continue
    try:
      config_lib.check_skeleton(own)
      for check in _CHECKS:
        check(own)
    except ConfigError as e:
      raise config_lib.group_error(config, g, e) from None
  teachers.check_groups(config)
  mesh.check_config(config, num_devices=num_devices,
                    num_groups_here=num_groups_here, groups=groups)

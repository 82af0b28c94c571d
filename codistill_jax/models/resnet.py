"""Small pre-activation ResNet with GroupNorm, for 28x28 up to ImageNet inputs.

Pre-activation ("v2", He et al. 2016) basic blocks, GroupNorm instead of
BatchNorm: codistillation runs the peers' forward passes vmapped over stacked
parameters, so the model must be a pure function of `params` with no
`batch_stats` collection, and its output for an example must not depend on the
rest of the batch.

Stage i has `width * 2**i` channels; every stage after the first halves H and W.
`stem='cifar'` is one 3x3 conv at full resolution (28x28, 32x32 inputs);
`stem='imagenet'` is the 7x7 stride-2 conv + 3x3 stride-2 max-pool that brings
224x224 down by 4 before the first stage.

Input: float [b, H, W, C] (a missing channel axis, [b, H, W], is read as C=1).
Returns float32 logits [b, num_classes].
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from codistill_jax import models as models_lib

from codistill_jax.errors import ConfigError

# He init: the convs feed ReLUs, and without BatchNorm re-scaling every layer
# the initial scale matters more than it does in the BatchNorm original.
_conv_init = nn.initializers.he_normal()


def _norm(channels: int, dtype) -> nn.GroupNorm:
  # 32 groups as in Wu & He (2018); the gcd keeps any width valid (e.g. 48
  # channels -> 16 groups) instead of failing on a width not divisible by 32.
  return nn.GroupNorm(num_groups=math.gcd(32, channels), dtype=dtype)


class _Block(nn.Module):
  """Pre-activation basic block: (GN, ReLU, 3x3 conv) x 2 plus shortcut."""

  features: int
  strides: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    y = nn.relu(_norm(x.shape[-1], self.dtype)(x))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      # Projection from the pre-activated input, as in the v2 paper, so the
      # shortcut too sees normalised activations.
      shortcut = nn.Conv(self.features, (1, 1), self.strides, use_bias=False,
                         kernel_init=_conv_init, dtype=self.dtype,
                         name="proj")(y)
    y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False,
                kernel_init=_conv_init, dtype=self.dtype)(y)
    y = nn.relu(_norm(self.features, self.dtype)(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False,
                kernel_init=_conv_init, dtype=self.dtype)(y)
    return shortcut + y


# Ranges of the fields a config may set (config_lib.check_ranges).
RANGES = {"num_classes": "> 1", "stage_sizes": "> 0", "width": "> 0",
          "dropout_rate": "[0, 1)"}


class Model(nn.Module):
  """Pre-activation ResNet with GroupNorm.

  Attributes:
    num_classes: number of output classes.
    stage_sizes: number of blocks in each stage.
    width: channels of the first stage; doubles at every later stage.
    stem: 'cifar' (3x3 conv, full resolution) or 'imagenet' (7x7/2 conv +
      3x3/2 max-pool).
    dropout_rate: dropout on the pooled features before the classifier (train
      only).
    dtype: compute dtype; parameters stay float32 and logits are float32.
  """

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2)
  width: int = 32
  stem: str = "cifar"
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    h = models_lib.channels_last(x, self.dtype)
    if self.stem == "cifar":
      h = nn.Conv(self.width, (3, 3), use_bias=False, kernel_init=_conv_init,
                  dtype=self.dtype, name="stem")(h)
    elif self.stem == "imagenet":
      h = nn.Conv(self.width, (7, 7), (2, 2), use_bias=False,
                  kernel_init=_conv_init, dtype=self.dtype, name="stem")(h)
      h = nn.max_pool(h, (3, 3), strides=(2, 2), padding="SAME")
    else:
      raise ConfigError(
          f"resnet stem={self.stem!r}; use 'cifar' (small images) or "
          "'imagenet' (224x224)")
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        h = _Block(self.width * 2**i, strides=2 if i > 0 and j == 0 else 1,
                   dtype=self.dtype, name=f"stage{i}_block{j}")(h)
    # Pre-activation blocks leave the residual stream un-normalised, hence one
    # last GN + ReLU before pooling.
    h = nn.relu(_norm(h.shape[-1], self.dtype)(h))
    h = jnp.mean(h, axis=(1, 2))
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h)
    return logits.astype(jnp.float32)

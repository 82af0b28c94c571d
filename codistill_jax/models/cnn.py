"""Small convolutional classifier for 28x28 grey-scale images (MNIST-like).

Conv-ReLU-maxpool blocks followed by one hidden dense layer: the classic
few-hundred-thousand-parameter model that trains in seconds on CPU, which makes
it the default for quick codistillation runs and tests.

Input: float [b, H, W, C] (a missing channel axis, [b, H, W], is read as C=1).
Returns float32 logits [b, num_classes].
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from codistill_jax import models as models_lib


# Ranges of the fields a config may set (config_lib.check_ranges).
RANGES = {"num_classes": "> 1", "features": "> 0", "hidden": "> 0",
          "dropout_rate": "[0, 1)"}


class Model(nn.Module):
  """Conv blocks (3x3 conv, ReLU, 2x2 max-pool) -> dense -> logits.

  Attributes:
    num_classes: number of output classes.
    features: output channels of each conv block; each block halves H and W.
    hidden: width of the hidden dense layer.
    dropout_rate: dropout before the output layer (train only).
    dtype: compute dtype; parameters stay float32 and logits are float32.
  """

  num_classes: int
  features: Sequence[int] = (32, 64)
  hidden: int = 128
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    h = models_lib.channels_last(x, self.dtype)
    for f in self.features:
      h = nn.relu(nn.Conv(f, (3, 3), dtype=self.dtype)(h))
      h = nn.max_pool(h, (2, 2), strides=(2, 2))
    h = h.reshape(h.shape[0], -1)
    h = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(h))
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h)
    return logits.astype(jnp.float32)

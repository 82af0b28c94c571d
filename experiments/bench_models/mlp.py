"""A plain MLP classifier on flattened inputs (the exchange/loop benchmarks).

784-512-512-10 on Fashion-MNIST: ~670k params (2.7 MB float32), the model a
PyTorch user would write for the same comparison
(experiments/torch_peer_loop.py builds the same one).
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

RANGES = {"num_classes": "> 1", "hidden": "> 0"}


class Model(nn.Module):
  num_classes: int
  hidden: Sequence[int] = (512, 512)

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    h = x.reshape(x.shape[0], -1).astype(jnp.float32)
    for i, width in enumerate(self.hidden):
      h = nn.relu(nn.Dense(width, name=f"hidden_{i}")(h))
    return nn.Dense(self.num_classes, name="out")(h)

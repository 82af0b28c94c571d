"""A two-layer MLP classifier: a model plug-in of your own.

The protocol (codistill_jax/models/__init__.py): a Linen `Model` whose
`__call__(x, train)` gives logits; fields the data's `info` names
(num_classes) are filled in; `RANGES` declares the numeric fields' ranges.
"""

import flax.linen as nn

RANGES = {"width": "> 0"}


class Model(nn.Module):
  num_classes: int
  width: int = 8

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.width)(x)))

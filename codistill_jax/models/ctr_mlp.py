"""Embedding + MLP click-through-rate model: one binary logit per example.

Each categorical column gets its own embedding table (sizes from the dataset's
`cardinalities`); the embeddings are concatenated with the dense features and
fed through a ReLU MLP. This is the usual small CTR baseline (as in the
Criteo experiments of the codistillation paper), kept free of feature crosses so
that differences between groups come from training, not architecture.

Input `x = {'cat': int32 [b, n_cat], 'dense': float32 [b, num_dense]}`; dense
features are used as given (any log/standardisation belongs to the data
module). Returns float32 logits of shape [b].
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from codistill_jax.errors import ConfigError


# Ranges of the fields a config may set (config_lib.check_ranges).
RANGES = {"num_dense": ">= 0", "embed_dim": "> 0", "hidden_sizes": "> 0",
          "dropout_rate": "[0, 1)", "cardinalities": "> 0"}


class Model(nn.Module):
  """Embeddings of categorical columns + dense features -> MLP -> one logit.

  Attributes:
    cardinalities: number of distinct ids of each categorical column; ids of
      column j must lie in [0, cardinalities[j]).
    num_dense: number of dense (float) features.
    embed_dim: width of every embedding table.
    hidden_sizes: widths of the hidden ReLU layers.
    dropout_rate: dropout after each hidden layer (train only).
    dtype: compute dtype; parameters stay float32 and logits are float32.
  """

  cardinalities: Sequence[int]
  num_dense: int
  embed_dim: int = 16
  hidden_sizes: Sequence[int] = (256, 128)
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    cat, dense = x["cat"], x["dense"]
    if cat.shape[-1] != len(self.cardinalities):
      raise ConfigError(
          f"ctr_mlp got {cat.shape[-1]} categorical columns but "
          f"{len(self.cardinalities)} cardinalities; the data's "
          "'cardinalities' must have one entry per column of x['cat']")
    if dense.shape[-1] != self.num_dense:
      raise ConfigError(
          f"ctr_mlp got {dense.shape[-1]} dense features but "
          f"num_dense={self.num_dense}")
    # One table per column (not one shared hashed table): the columns have
    # very different cardinalities and a shared table would let frequent ids of
    # one column collide with those of another.
    embs = [
        nn.Embed(n, self.embed_dim, dtype=self.dtype, name=f"embed_{j}")(
            cat[:, j])
        for j, n in enumerate(self.cardinalities)
    ]
    h = jnp.concatenate(embs + [dense.astype(self.dtype)], axis=-1)
    for i, size in enumerate(self.hidden_sizes):
      h = nn.relu(nn.Dense(size, dtype=self.dtype, name=f"hidden_{i}")(h))
      h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    logit = nn.Dense(1, dtype=self.dtype, name="out")(h)
    return logit[:, 0].astype(jnp.float32)

"""A toy problem (the label is the sign of the first of 4 features): a dataset
plug-in of your own.

The protocol (codistill_jax/data/__init__.py): `get_datasets(...)` returns
`pipeline.Datasets`, here through `pipeline.assemble`, which cuts the
group shards and batch orders. Its eval splits are called 'dev' and 'final':
the trainer evaluates the first during training and all at the end.
"""

import numpy as np

from codistill_jax.data import pipeline

RANGES = {"num_examples": "> 0"}


def get_datasets(config, *, group, num_groups, process_index, process_count):
  rng = np.random.default_rng(0)
  n = config.data.num_examples
  x = rng.normal(size=(n, 4)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)

  def split(rows):
    return pipeline.ArraySplit(len(rows), lambda i: {
        "inputs": x[rows[i]], "labels": y[rows[i]],
        "weights": np.ones(len(i), np.float32)})

  rows = np.arange(n)
  splits = {"train": split(rows[:-40]), "dev": split(rows[-40:-20]),
            "final": split(rows[-20:])}
  return pipeline.assemble(config, splits, {"num_classes": 2}, group=group,
                           num_groups=num_groups, process_index=process_index,
                           process_count=process_count)

"""Flax models: one module per family, all with the same small protocol.

A model module `codistill_jax/models/<name>.py` (selected by
`config.model_name`) defines a Linen module class `Model`; the trainer builds it
as `Model(**config.model, **from_data)` where `from_data` holds the entries of
the dataset's `info` (num_classes, vocab_size, cardinalities, ...) that are
fields of `Model` and not set in `config.model`. `Model.__call__(x, train)`
returns logits: [b, num_classes], [b] for one binary logit, or [b, L, vocab].
Models that support sampled output heads also define `hidden(x, train)` and
`output_embedding(params)`.
"""

import dataclasses
from typing import Any, Mapping

from codistill_jax import plugins
from codistill_jax.errors import ConfigError


def get_module(name: str):
  """Imports `codistill_jax.models.<name>` or raises a ConfigError."""
  return plugins.load("models", name, "config.model_name")


def available() -> list[str]:
  return plugins.available("models")


def build(name: str, kwargs: Mapping[str, Any], info: Mapping[str, Any]):
  """Returns `Model(**kwargs, **fields_from_info)` of model module `name`."""
  cls = get_module(name).Model
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ConfigError(
        f"config.model has unknown field(s) {unknown} for model {name!r}; "
        f"valid fields: {sorted(fields - {'parent', 'name'})}")
  from_data = {k: v for k, v in info.items() if k in fields and k not in kwargs}
  return cls(**kwargs, **from_data)

"""Flax models: one module per family, all with the same small protocol.

A model module (selected by `config.model_name`: a module of this package or
a dotted module path of your own) defines a Linen module class `Model`; the
trainer builds it as `Model(**config.model, **from_data)` where `from_data`
holds the entries of the dataset's `info` (num_classes, vocab_size,
cardinalities, ...) that are fields of `Model` and not set in `config.model`.
`Model.__call__(x, train)` returns logits: [b, num_classes], [b] for one
binary logit, or [b, L, vocab]. Models that support sampled output heads also
define `hidden(x, train)` and `output_embedding(params)`. A module may declare
`RANGES` ({field: '> 0', ...}) for its numeric fields and `CHOICES` ({field:
('a', 'b'), ...}) for its string fields; validation reads both.
"""

import dataclasses
from typing import Any, Mapping

from codistill_jax import config_lib
from codistill_jax import plugins
from codistill_jax.errors import ConfigError


def get_module(name: str, field: str = "config.model_name"):
  """The model module `name` (see plugins.load) or a ConfigError."""
  return plugins.load("models", name, field, required=("Model",))


def available() -> list[str]:
  return plugins.available("models")


def fields(cls) -> dict[str, Any]:
  """{field: default (or dataclasses.MISSING)} a config may set on `cls`."""
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.name not in ("parent", "name")}


def check_kwargs(name: str, kwargs: Mapping[str, Any], field: str) -> None:
  """`kwargs` are fields of model `name`, typed like and in their ranges.

  Args:
    name: the model module.
    kwargs: what the config sets, e.g. config.model.
    field: how kwargs is named in messages, e.g. 'config.model'.
  """
  module = get_module(name, "config.model_name" if field == "config.model"
                      else "config.codistill.teacher_model_name")
  known = fields(module.Model)
  unknown = sorted(set(kwargs) - set(known))
  if unknown:
    raise ConfigError(f"{field} has unknown field(s) {unknown} for model "
                      f"{name!r}; valid: {sorted(known)}")
  for k, default in known.items():
    if k in kwargs and default is not dataclasses.MISSING:
      config_lib.check_like(f"{field}.{k}", kwargs[k], default)
  config_lib.check_ranges(kwargs, getattr(module, "RANGES", {}), field)
  for k, choices in getattr(module, "CHOICES", {}).items():
    if k in kwargs and kwargs[k] not in choices:
      raise ConfigError(f"{field}.{k}={kwargs[k]!r} is unknown; use one of "
                        f"{tuple(choices)}")


def check_config(config) -> None:
  """config.model_name / config.model (and a teacher model, when named)."""
  check_kwargs(config.model_name, config.model, "config.model")
  cd = config.codistill
  if cd.teacher_model_name:  # (teacher_model counts only with a name.)
    check_kwargs(cd.teacher_model_name, cd.teacher_model,
                 "config.codistill.teacher_model")
  if cd.sampled.num_samples:  # Sampled distillation reaches into the
    # student's output layer (a fixed teacher's is its source's check).
    check_sampled_head(config.model_name, "config.model_name",
                       cd.sampled.num_samples)


def check_sampled_head(name: str, field: str, num_samples: int) -> None:
  """Model `name` exposes `hidden` and `output_embedding` (a sampled output
  layer), as sampled distillation with K = `num_samples` needs."""
  cls = get_module(name, field).Model
  if not (hasattr(cls, "hidden") and hasattr(cls, "output_embedding")):
    raise ConfigError(f"config.codistill.sampled.num_samples={num_samples}: "
                      f"{field}={name!r} exposes no hidden/output_embedding "
                      "(a sampled output layer); use num_samples=0")


def check_length(model: str, length: int, max_len: int) -> None:
  """Sequence models refuse inputs longer than `config.model.max_len`."""
  if length > max_len:
    raise ConfigError(f"{model} got sequences of length {length} > "
                      f"config.model.max_len={max_len}; raise "
                      "config.model.max_len or shorten the data's sequences")


def channels_last(x, dtype):
  """Images [b, h, w] or [b, h, w, c] as [b, h, w, c] in `dtype`."""
  return (x[..., None] if x.ndim == 3 else x).astype(dtype)


def build(name: str, kwargs: Mapping[str, Any], info: Mapping[str, Any]):
  """Returns `Model(**kwargs, **fields_from_info)` of model module `name`."""
  cls = get_module(name).Model
  known = fields(cls)
  unknown = sorted(set(kwargs) - set(known))
  if unknown:
    raise ConfigError(
        f"config.model has unknown field(s) {unknown} for model {name!r}; "
        f"valid fields: {sorted(known)}")
  from_data = {k: v for k, v in info.items() if k in known and k not in kwargs}
  return cls(**kwargs, **from_data)

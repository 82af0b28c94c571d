"""Reading sources: the on-disk cache, file stamps, and tfds data sources.

Nothing here decides which examples go where (`order.py`) or how they become
batches (`pipeline.py`).
"""

from __future__ import annotations

import os
from typing import Any

from codistill_jax.errors import ConfigError


def file_stamp(path: str) -> tuple[int, int] | None:
  """(size, mtime) of a file, to key in-process caches; None for ''."""
  if not path:
    return None
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns


def cache_dir(config) -> str:
  """`config.data.cache_dir`, or ~/.cache/codistill_jax when it is ''."""
  path = config.data.get("cache_dir", "") or os.path.join(
      os.path.expanduser("~"), ".cache", "codistill_jax")
  os.makedirs(path, exist_ok=True)
  return path


def check_tfds_source(config, example: str) -> None:
  """tfds_name, data_dir and train_split of a tfds-backed module."""
  data = config.data
  if not data.tfds_name:
    raise ConfigError("config.data.tfds_name is empty; name a tfds dataset, "
                      f"e.g. --config.data.tfds_name={example}")
  if data.data_dir and not os.path.isdir(data.data_dir):
    raise ConfigError(f"config.data.data_dir={data.data_dir}: no such "
                      "directory; point it at the tfds data dir holding "
                      f"{data.tfds_name} as array_record")
  if not data.train_split:
    raise ConfigError("config.data.train_split is empty; e.g. 'train'")



def open_tfds(config) -> tuple[Any, dict[str, Any]]:
  """The tfds builder and random-access sources of 'train' and each eval split.

  Reads `config.data.tfds_name`, `data_dir` ('' = tfds's default),
  `train_split` and `eval_splits` ({name: tfds split}). The dataset must
  already be prepared as array_record: nothing is downloaded (and TensorFlow,
  which tfds would need to build or read TFRecords, is not a dependency).

  Returns:
    (builder, {'train': source, **{name: source}}), each source a sequence of
    example dicts (numpy arrays).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data = config.data
  where = f"config.data.data_dir={data.data_dir!r}"
  try:
    builder = tfds.builder(data.tfds_name, data_dir=data.data_dir or None,
                           try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f"config.data.tfds_name={data.tfds_name!r}: no such "
                      f"tfds dataset (looked in {where})") from None
  fields = {"train": ("train_split", data.train_split),
            **{name: (f"eval_splits.{name}", split)
               for name, split in data.eval_splits.items()}}
  sources = {}
  for name, (field, split) in fields.items():
    try:
      sources[name] = builder.as_data_source(split=split)
    except Exception as e:  # pylint: disable=broad-except
      # tfds answers an unprepared dataset or a bad split with assorted
      # exception types; which one it was is said by is_prepared().
      if not builder.is_prepared():
        raise ConfigError(
            f"config.data.tfds_name={data.tfds_name!r} is not prepared in "
            f"{where}; prepare it as array_record first, e.g. `tfds build "
            f"{data.tfds_name} --data_dir=DIR --file_format=array_record`, "
            "and set --config.data.data_dir=DIR") from None
      raise ConfigError(f"config.data.{field}={split!r}: {e}") from None
  return builder, sources

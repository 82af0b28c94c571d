"""Reading sources: the on-disk cache, file stamps, and tfds data sources.

Nothing here decides which examples go where (`order.py`) or how they become
batches (`pipeline.py`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Callable, Iterator

from absl import logging
import numpy as np

from codistill_jax.errors import ConfigError
from codistill_jax.errors import StorageError


def file_stamp(path: str) -> tuple[int, int] | None:
  """(size, mtime) of a file, to key in-process caches; None for ''."""
  if not path:
    return None
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns


def _writable_dir(path: str) -> bool:
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return False
  return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def cache_dir(config) -> str:
  """`config.data.cache_dir`, or ~/.cache/codistill_jax when it is ''.

  A cache_dir the config names must be writable (else a ConfigError naming
  it). The default one may not be (a read-only or missing $HOME on a
  cluster node): then a per-user folder in the temporary directory serves,
  with one warning, and only when neither can be written is it an error.
  """
  named = config.data.get("cache_dir", "")
  if named:
    if not _writable_dir(named):
      raise ConfigError(f"config.data.cache_dir={named} cannot be created or "
                        "written; point it at a writable directory")
    return named
  home = os.path.join(os.path.expanduser("~"), ".cache", "codistill_jax")
  if _writable_dir(home):
    return home
  fallback = os.path.join(tempfile.gettempdir(),
                          f"codistill_jax-cache-{os.getuid()}")
  if not _writable_dir(fallback):
    raise ConfigError(f"neither {home} nor {fallback} can be written for the "
                      "data cache; set config.data.cache_dir to a writable "
                      "directory")
  logging.warning("%s cannot be written (HOME=%s); caching data in %s: set "
                  "config.data.cache_dir to choose where", home,
                  os.environ.get("HOME", ""), fallback)
  return fallback


def read_cached(path: str, read: Callable[[], Any]) -> Any:
  """`read()` of a cache entry, or None (with a warning) when it is damaged:
  a cache is rebuilt, never trusted or fatal."""
  try:
    return read()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("data cache %s is damaged (%s: %s); building it again",
                    path, type(e).__name__, str(e).splitlines()[0][:120]
                    if str(e) else "")
    return None


def load_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def save_npz(path: str, arrays: dict[str, Any]) -> None:
  """Writes arrays to `path` atomically (see `cache_write`)."""
  with cache_write(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **arrays)


@contextlib.contextmanager
def cache_write(path: str) -> Iterator[str]:
  """Yields a temporary name to write `path` under; renames it into place
  when the block ends, removes it on a failure. A full or read-only cache is
  a StorageError naming it and the fix."""
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    yield tmp
    os.replace(tmp, path)
  except OSError as e:
    raise StorageError(
        f"cannot write the data cache {path}: {e.strerror or e}; free space "
        "or set config.data.cache_dir to a writable directory") from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


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

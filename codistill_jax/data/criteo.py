"""Criteo display-advertising logs in their released TSV layout.

Each line: label \\t 13 integer features \\t 26 categorical features (8 hex
digits each in the release); any field may be empty. This is the data of the
codistillation paper's CTR experiments; no machine of this project has it, so
the tests run this reader on small files they write.

  categorical: each column hashed into `config.data.hash_buckets` ids with a
    fixed, documented hash (64-bit FNV-1a of the UTF-8 bytes, mixed with the
    column number by splitmix64), never Python's per-process salted hash(),
    so every host and every run agree. Id 0 is "empty"; values take ids
    1 .. hash_buckets - 1.
  dense: log1p(max(x, 0)); empty -> 0.

Rows are split 90/5/5 into train / validation / test by a permutation keyed by
`config.data.split_seed`. The whole file is held in memory as int32/float32
arrays (~160 bytes a row: the 45M-row Kaggle release takes ~7 GB; the 4B-row
terabyte release needs a sharded streaming reader, which this is not).

Config fields (config.data.*): path (the TSV file), hash_buckets, max_rows
(0 = all), batch_size, eval_batch_size, split_seed, partition.
"""

from __future__ import annotations

import csv
import functools
import os

import numpy as np

from codistill_jax.data import order
from codistill_jax.data import pipeline
from codistill_jax.data import sources
from codistill_jax.errors import ConfigError

NUM_DENSE = 13
NUM_CAT = 26
SPLIT_FRACTIONS = {"validation": 0.05, "test": 0.05}
_CHUNK_ROWS = 1 << 18
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


# Ranges of this module's config.data fields (config_lib.check_ranges):
# id 0 of every hashed column is reserved for empty fields; max_rows 0 = all.
RANGES = {"hash_buckets": ">= 2", "max_rows": ">= 0"}


def check(config) -> None:
  """Cheap checks: the file exists, sizes are sane."""
  path = config.data.path
  if not path or not os.path.isfile(path):
    raise ConfigError(f"config.data.path={path!r}: no such file; set "
                      "--config.data.path to a Criteo TSV file (label, 13 "
                      "integer and 26 categorical tab-separated columns)")


def fnv1a(values: np.ndarray) -> np.ndarray:
  """64-bit FNV-1a of each string's UTF-8 bytes (uint64), vectorised.

  Strings are laid out as a fixed-width byte matrix; bytes past a string's end
  are skipped, so a value hashes the same whatever the width of its chunk.
  """
  try:
    raw = values.astype("S")
  except UnicodeEncodeError:  # Not the released hex data; slower but correct.
    raw = np.array([v.encode("utf-8") for v in values], dtype="S")
  width = raw.dtype.itemsize
  lengths = np.char.str_len(raw)
  data = raw.view(np.uint8).reshape(len(raw), width)
  h = np.full(len(raw), _FNV_OFFSET, np.uint64)
  for j in range(width):
    # Arrays wrap modulo 2**64, which FNV wants.
    h = np.where(j < lengths, (h ^ data[:, j].astype(np.uint64)) * _FNV_PRIME,
                 h)
  return h


def hash_column(values: np.ndarray, column: int, buckets: int) -> np.ndarray:
  """Ids of one categorical column: 0 if empty, else 1 .. buckets - 1."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  empty = pd.isna(values)
  strings = np.where(empty, "", values).astype(str)
  empty |= strings == ""
  mixed = order.mix64(fnv1a(strings) ^ np.uint64(order.hash_key(column)))
  ids = 1 + mixed % np.uint64(buckets - 1)
  return np.where(empty, 0, ids).astype(np.int32)


def read(path: str, hash_buckets: int, max_rows: int = 0) -> tuple[
    np.ndarray, np.ndarray, np.ndarray]:
  """The file as (int32 cat [n, 26], float32 dense [n, 13], float32 labels).

  Cached in-process (one entry: a process driving several groups parses the
  file once), keyed by the file's size and mtime; do not modify the arrays.
  """
  return _read(path, sources.file_stamp(path), hash_buckets, max_rows)


@functools.lru_cache(maxsize=1)
def _read(path: str, stamp, hash_buckets: int, max_rows: int):
  del stamp  # Only part of the cache key.
  import pandas as pd  # pylint: disable=g-import-not-at-top
  names = (["label"] + [f"i{k}" for k in range(NUM_DENSE)] +
           [f"c{k}" for k in range(NUM_CAT)])
  dtypes = {"label": np.float64,
            **{f"i{k}": np.float64 for k in range(NUM_DENSE)},
            **{f"c{k}": object for k in range(NUM_CAT)}}
  with open(path, encoding="utf-8", errors="replace") as f:
    fields = f.readline().rstrip("\r\n").split("\t")
  if len(fields) != len(names):
    raise ConfigError(f"config.data.path={path}: the first line has "
                      f"{len(fields)} tab-separated fields; a Criteo TSV has "
                      f"{len(names)} (label, {NUM_DENSE} integer, {NUM_CAT} "
                      "categorical)")
  cats, denses, labels = [], [], []
  try:
    # Only empty fields are missing: 'NA' or 'null' would be values.
    reader = pd.read_csv(path, sep="\t", header=None, names=names,
                         index_col=False, dtype=dtypes, keep_default_na=False,
                         na_values=[""], quoting=csv.QUOTE_NONE,
                         chunksize=_CHUNK_ROWS, nrows=max_rows or None)
    for chunk in reader:
      label = chunk["label"].to_numpy()
      bad = ~np.isin(label, (0, 1))  # Also catches empty labels (NaN).
      if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ConfigError(f"config.data.path={path}: row "
                          f"{sum(map(len, labels)) + first + 1} has label "
                          f"{label[first]!r}, not 0 or 1")
      dense = chunk[names[1:1 + NUM_DENSE]].to_numpy(np.float64)
      denses.append(np.log1p(np.maximum(np.nan_to_num(dense, nan=0.0), 0))
                    .astype(np.float32))
      cats.append(np.stack(
          [hash_column(chunk[f"c{k}"].to_numpy(object), k, hash_buckets)
           for k in range(NUM_CAT)], axis=1))
      labels.append(label.astype(np.float32))
  except (ValueError, pd.errors.ParserError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"config.data.path={path}: not a Criteo TSV (label, "
                      f"{NUM_DENSE} integer, {NUM_CAT} categorical columns): "
                      f"{e}") from None
  if not labels:
    raise ConfigError(f"config.data.path={path}: no rows")
  return np.concatenate(cats), np.concatenate(denses), np.concatenate(labels)


def _gather(cat, dense, labels, index: np.ndarray) -> dict:
  return {"inputs": {"cat": cat[index], "dense": dense[index]},
          "labels": labels[index], "weights": np.ones(len(index), np.float32)}


def get_datasets(config, *, group: int, num_groups: int, process_index: int,
                 process_count: int) -> pipeline.Datasets:
  check(config)
  cat, dense, labels = read(config.data.path, config.data.hash_buckets,
                            config.data.max_rows)
  rows = order.split_indices(
      len(labels), order.fraction_sizes(len(labels), SPLIT_FRACTIONS),
      config.data.get("split_seed", 0))
  splits = {name: pipeline.ArraySplit(len(r), functools.partial(
      _gather, cat[r], dense[r], labels[r])) for name, r in rows.items()}
  info = {
      "cardinalities": (config.data.hash_buckets,) * NUM_CAT,
      "num_dense": NUM_DENSE,
      "positive_rate": float(labels[rows["train"]].mean()),
  }
  return pipeline.assemble(config, splits, info, group=group,
                         num_groups=num_groups, process_index=process_index,
                         process_count=process_count)

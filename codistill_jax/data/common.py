"""What every input pipeline shares: splits, group shards, batch order.

A data module only knows how to read its source and turn example indices into
arrays. Everything about *which* examples go where lives here, once:

  * `split_indices`: a fixed-seed split of N examples into train / validation /
    test (or any named splits).
  * `partition`: group g's share of the training split ('disjoint' shards that
    cover it exactly, or 'shared': everything, in the group's own order).
  * `TrainOrder`: the examples of this host's rows of the global batch at step
    s, a pure function of (seed, group, s), so a resumed run is seekable.
  * `eval_order`: the split in order, padded to whole global batches, the same
    number of batches on every host.
  * `assemble`: glues the above into a `Datasets`, either over arrays held in
    memory (`ArraySplit`, gathered a batch at a time) or over random-access
    records (`RecordSplit`, e.g. a tfds ArrayRecord source, read example by
    example on grain threads).

Randomness here comes from a splitmix64 hash of integer keys instead of
`np.random`: it is a few lines, vectorised, and gives the same splits and
batch orders whatever the numpy version, which matters for a split that a
paper's numbers are measured on.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from codistill_jax.errors import ConfigError

# Distinct tags keep the streams drawn for different purposes independent even
# when the user passes the same seed for all of them.
_SPLIT_TAG = 0x5EED_5B17
_PARTITION_TAG = 0x5EED_9A27
_EPOCH_TAG = 0x5EED_E90C

PARTITION_MODES = ("disjoint", "shared")


@dataclasses.dataclass(frozen=True)
class Datasets:
  """What a data module hands the trainer.

  Attributes:
    train: `train(start_step)` iterates over this host's share of the group's
      global batch for steps start_step, start_step + 1, ... (endless).
    evals: split name -> a function returning a fresh, finite, padded iterator
      over that split (every host gets the same number of batches).
    info: facts about the data that a model or the trainer may need
      (num_classes, vocab_size, cardinalities, num_examples, ...).
  """
  train: Callable[[int], Iterator[dict]]
  evals: Mapping[str, Callable[[], Iterator[dict]]]
  info: Mapping[str, Any]


# ----------------------------------------------------------------------------
# Stable hashing.
# ----------------------------------------------------------------------------
_U64 = np.uint64


def mix64(x) -> np.ndarray:
  """splitmix64's finaliser: a bijection on uint64 that scrambles every bit."""
  x = np.asarray(x, dtype=_U64)
  # Arithmetic modulo 2**64 is what the hash wants; numpy only warns about it
  # for scalars.
  with np.errstate(over="ignore"):
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def hash_key(*parts: int) -> int:
  """Folds integers (seeds, group ids, epochs, tags) into one 64-bit key."""
  key = np.zeros((), _U64)
  for p in parts:
    # Python ints may be negative or wider than 64 bits; reduce them first.
    key = mix64(key ^ _U64(int(p) % 2**64))
  return int(key)


def permutation(n: int, *key: int) -> np.ndarray:
  """A permutation of range(n) determined by `key` alone (int64)."""
  scores = mix64(np.arange(n, dtype=_U64) ^ _U64(hash_key(*key)))
  # mix64 is a bijection, so the scores are distinct and the order is unique.
  return np.argsort(scores, kind="stable").astype(np.int64)


# ----------------------------------------------------------------------------
# Splits and group partitions.
# ----------------------------------------------------------------------------
def fraction_sizes(num_examples: int,
                   fractions: Mapping[str, float]) -> dict[str, int]:
  """Turns split fractions into counts, at least one example each.

  Tiny corpora (a test's handful of files, `max_files=20`) would otherwise get
  empty evaluation splits.

  Args:
    num_examples: how many examples there are in all.
    fractions: split name -> fraction of `num_examples`.

  Returns:
    split name -> count; the counts leave at least one example for training.
  """
  sizes = {k: max(1, int(round(f * num_examples)))
           for k, f in fractions.items()}
  if sum(sizes.values()) >= num_examples:
    raise ConfigError(
        f"only {num_examples} examples: too few to split into train and "
        f"{', '.join(sizes)}; use more data (e.g. a larger "
        "config.data.max_files or config.data.max_rows)")
  return sizes


def split_indices(num_examples: int, sizes: Mapping[str, int],
                  seed: int) -> dict[str, np.ndarray]:
  """Splits range(num_examples) into named splits by a fixed-seed permutation.

  The permutation is `permutation(num_examples, seed, tag)`; the splits named
  in `sizes` take consecutive runs of it in the order given, and 'train' takes
  the rest. Each split's indices are returned sorted, so an eval walks its
  split in source order.

  Args:
    num_examples: N.
    sizes: split name -> number of examples, e.g. {'validation': 5000}.
    seed: the split seed (`config.data.split_seed`).

  Returns:
    {'train': ..., **sizes}: disjoint sorted int64 arrays covering range(N).
  """
  if "train" in sizes:
    raise ValueError("'train' takes what the other splits leave")
  if sum(sizes.values()) > num_examples or min(sizes.values(), default=0) < 0:
    raise ConfigError(f"cannot take splits {dict(sizes)} from {num_examples} "
                      "examples")
  order = permutation(num_examples, seed, _SPLIT_TAG)
  out, start = {}, 0
  for name, size in sizes.items():
    out[name] = np.sort(order[start:start + size])
    start += size
  return {"train": np.sort(order[start:]), **out}


def partition(indices: np.ndarray, num_groups: int, group: int, mode: str,
              seed: int) -> np.ndarray:
  """The examples (of `indices`) that group `group` trains on.

  'disjoint': the groups' shards are disjoint, differ in size by at most one
  and together are exactly `indices` (a fixed-seed shuffle first, so a shard is
  not one contiguous stretch of the source, e.g. one month of flights).
  'shared': every group gets all of `indices`; its batches still differ,
  because `TrainOrder` seeds the shuffle with the group.

  Args:
    indices: the training split (any order).
    num_groups: G.
    group: this group, 0 <= group < G.
    mode: `config.data.partition`.
    seed: the split seed, so a group's shard is a property of the data and does
      not move when only the run's `config.seed` changes.

  Returns:
    This group's indices, sorted, int64.
  """
  indices = np.asarray(indices, np.int64)
  if not 0 <= group < num_groups:
    raise ValueError(f"group={group} is not in [0, {num_groups})")
  if mode == "shared":
    return np.sort(indices)
  if mode != "disjoint":
    raise ConfigError(f"config.data.partition={mode!r}: use one of "
                      f"{PARTITION_MODES}")
  if len(indices) < num_groups:
    raise ConfigError(f"config.num_groups={num_groups} disjoint shards of only "
                      f"{len(indices)} training examples; use fewer groups or "
                      "config.data.partition='shared'")
  shuffled = indices[permutation(len(indices), seed, _PARTITION_TAG)]
  # Shard g is the g-th of G near-equal contiguous pieces of the shuffle.
  bounds = [len(indices) * g // num_groups for g in range(num_groups + 1)]
  return np.sort(shuffled[bounds[group]:bounds[group + 1]])


# ----------------------------------------------------------------------------
# Batch sizes.
# ----------------------------------------------------------------------------
def host_batch_size(batch_size: int, process_count: int, field: str) -> int:
  """This host's rows of a global batch; raises unless they divide evenly."""
  if batch_size <= 0:
    raise ConfigError(f"config.data.{field}={batch_size}: must be positive")
  if batch_size % process_count:
    raise ConfigError(
        f"config.data.{field}={batch_size} is not divisible by the "
        f"{process_count} processes (hosts); use a multiple of {process_count}")
  return batch_size // process_count


def check_positive(config, *fields: str) -> None:
  """Raises a ConfigError for the first `config.data.<field>` that is <= 0."""
  for field in fields:
    value = config.data[field]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ConfigError(f"config.data.{field}={value!r}: must be a positive "
                        "integer")


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


def check_batch_sizes(config) -> None:
  """The cheap part of the batch-size checks: both sizes positive integers."""
  check_positive(config, "batch_size", "eval_batch_size")
  if config.data.get("partition", "disjoint") not in PARTITION_MODES:
    raise ConfigError(f"config.data.partition={config.data.partition!r}: use "
                      f"one of {PARTITION_MODES}")


# ----------------------------------------------------------------------------
# Which examples make up each batch.
# ----------------------------------------------------------------------------
class TrainOrder:
  """The training examples behind this host's rows of the batch at a step.

  Epoch e is a permutation of the group's examples keyed by (seed, group, e);
  the global batch at step s is the (s mod steps_per_epoch)-th run of
  `batch_size` examples of epoch s // steps_per_epoch (the remainder of each
  epoch is dropped, so every batch is full), and host p of P reads rows
  [p*b/P, (p+1)*b/P) of it. Nothing depends on the steps before s.
  """

  def __init__(self, indices: np.ndarray, *, batch_size: int, seed: int,
               group: int, process_index: int, process_count: int):
    self.indices = np.asarray(indices, np.int64)
    self.batch_size = batch_size
    self.host_batch_size = host_batch_size(batch_size, process_count,
                                           "batch_size")
    if len(self.indices) < batch_size:
      raise ConfigError(
          f"config.data.batch_size={batch_size} is larger than group {group}'s "
          f"{len(self.indices)} training examples; use a smaller batch or "
          "fewer groups")
    self.steps_per_epoch = len(self.indices) // batch_size
    self._key = (seed, group)
    self._offset = process_index * self.host_batch_size
    # Consecutive steps share an epoch; two entries cover an epoch boundary
    # read by several threads at once.
    self._epoch = functools.lru_cache(maxsize=2)(self._permute)

  def _permute(self, epoch: int) -> np.ndarray:
    return self.indices[permutation(len(self.indices), *self._key, epoch,
                                    _EPOCH_TAG)]

  def __call__(self, step: int) -> np.ndarray:
    """Split indices of this host's rows at `step` (int64 [host_batch])."""
    if step < 0:
      raise ValueError(f"step={step} < 0")
    epoch, k = divmod(step, self.steps_per_epoch)
    start = k * self.batch_size + self._offset
    return self._epoch(epoch)[start:start + self.host_batch_size]


def eval_order(num_examples: int, *, batch_size: int, process_index: int,
               process_count: int) -> np.ndarray:
  """Split indices of this host's rows of every eval batch, -1 for padding.

  Global batch k holds examples [k*B, (k+1)*B) in split order, the last one
  padded; host p reads rows [p*B/P, (p+1)*B/P) of each, so every host runs
  ceil(N/B) batches whatever its share of real examples.

  Returns:
    int64 [num_batches, B/P].
  """
  hb = host_batch_size(batch_size, process_count, "eval_batch_size")
  num_batches = -(-num_examples // batch_size)
  rows = np.arange(num_batches * batch_size, dtype=np.int64).reshape(
      num_batches, batch_size)[:, process_index * hb:(process_index + 1) * hb]
  return np.where(rows < num_examples, rows, -1)


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


# ----------------------------------------------------------------------------
# The language-model layout (kernel_docs, tfds_text).
# ----------------------------------------------------------------------------
def lm_windows(ids: np.ndarray, seq_len: int, pad_id: int = 0) -> np.ndarray:
  """Cuts one document's ids (EOD already appended) into training windows.

  Window k holds ids[k*L : k*L + L + 1], so consecutive windows overlap by one
  id and every id after the first is a target exactly once; the last window is
  right-padded with `pad_id`.

  Args:
    ids: int [m].
    seq_len: L.
    pad_id: the padding id.

  Returns:
    int32 [ceil((m - 1) / L), L + 1]; no rows when m < 2 (nothing to predict).
  """
  ids = np.asarray(ids, np.int32)
  num = max(0, -(-(len(ids) - 1) // seq_len))
  padded = np.full(num * seq_len + 1, pad_id, np.int32)
  padded[:len(ids)] = ids[:len(padded)]
  starts = np.arange(num, dtype=np.int64)[:, None] * seq_len
  return padded[starts + np.arange(seq_len + 1)]


def lm_batch(windows: np.ndarray, pad_id: int = 0) -> dict:
  """Windows int [..., L + 1] -> inputs, labels (shifted by one), weights.

  A target that is padding gets weight 0, so padding never enters the loss.
  """
  windows = np.asarray(windows, np.int32)
  labels = windows[..., 1:]
  return {"inputs": windows[..., :-1], "labels": labels,
          "weights": (labels != pad_id).astype(np.float32)}


# ----------------------------------------------------------------------------
# From indices to batches.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ArraySplit:
  """A split held in memory.

  Attributes:
    size: number of examples.
    gather: int64 indices [b] -> {'inputs', 'labels', 'weights'} with leading
      dim b (fancy indexing into arrays; new arrays, safe to modify).
  """
  size: int
  gather: Callable[[np.ndarray], dict]


@dataclasses.dataclass(frozen=True)
class RecordSplit:
  """A split read one example at a time (e.g. a tfds ArrayRecord source).

  Attributes:
    size: number of examples.
    get: index -> {'inputs', 'labels', 'weights'} for one example, without the
      batch dim; run on grain's threads, so it must be thread-safe.
  """
  size: int
  get: Callable[[int], dict]


def _mask_padding(batch: dict, index: np.ndarray) -> dict:
  """Adds 'index' and zeroes the weights of padding rows (index -1)."""
  weights = np.asarray(batch["weights"], np.float32)
  real = (index >= 0).reshape((-1,) + (1,) * (weights.ndim - 1))
  return {**batch, "weights": np.where(real, weights, 0).astype(np.float32),
          "index": index.astype(np.int64)}


def _array_train(split: ArraySplit, order: TrainOrder):
  def train(start_step: int = 0) -> Iterator[dict]:
    step = start_step
    while True:
      index = order(step)
      yield _mask_padding(split.gather(index), index)
      step += 1
  return train


def _array_eval(split: ArraySplit, rows: np.ndarray):
  def evaluate() -> Iterator[dict]:
    for index in rows:
      # Padding rows repeat example 0: real values keep shapes, dtypes and
      # numerics ordinary; their weights are zeroed.
      yield _mask_padding(split.gather(np.maximum(index, 0)), index)
  return evaluate


# Grain reads records on this many threads, keeping this many batches ahead.
_GRAIN_THREADS = 8
_GRAIN_BATCHES_AHEAD = 4
# An endless train stream is a MapDataset of this many elements.
_ENDLESS = 2**62


def _read_options(host_batch: int):
  import grain  # pylint: disable=g-import-not-at-top
  return grain.ReadOptions(
      num_threads=_GRAIN_THREADS,
      prefetch_buffer_size=_GRAIN_BATCHES_AHEAD * host_batch)


def _stack(examples: Sequence[dict]) -> dict:
  return {k: (_stack([e[k] for e in examples]) if isinstance(v, dict)
              else np.stack([e[k] for e in examples]))
          for k, v in examples[0].items()}


def _get_one(split: RecordSplit, index: int) -> dict:
  example = split.get(max(int(index), 0))
  # Each element keeps its index so a batch can mask its own padding.
  return {**example, "index": np.int64(index)}


def _grain_batches(elements, split: RecordSplit, host_batch: int):
  """elements: a grain MapDataset of split indices (-1 = padding)."""
  ds = elements.map(functools.partial(_get_one, split))
  ds = ds.to_iter_dataset(_read_options(host_batch))
  ds = ds.batch(host_batch, drop_remainder=True, batch_fn=_stack)
  return (_mask_padding(b, b["index"]) for b in ds)


def _grain_train(split: RecordSplit, order: TrainOrder):
  import grain  # pylint: disable=g-import-not-at-top
  hb = order.host_batch_size

  def train(start_step: int = 0) -> Iterator[dict]:
    def index_of(j):
      step, row = divmod(j, hb)
      return int(order(start_step + step)[row])
    elements = grain.MapDataset.range(0, _ENDLESS).map(index_of)
    return _grain_batches(elements, split, hb)
  return train


def _grain_eval(split: RecordSplit, rows: np.ndarray):
  import grain  # pylint: disable=g-import-not-at-top

  def evaluate() -> Iterator[dict]:
    if not rows.size:
      return iter(())
    elements = grain.MapDataset.source(rows.reshape(-1).tolist())
    return _grain_batches(elements, split, rows.shape[1])
  return evaluate


def assemble(config, splits: Mapping[str, ArraySplit | RecordSplit],
             info: Mapping[str, Any], *, group: int, num_groups: int,
             process_index: int, process_count: int) -> Datasets:
  """Builds the `Datasets` of one group on one host.

  Args:
    config: the run config (reads seed, data.batch_size, data.eval_batch_size,
      data.partition, data.split_seed).
    splits: 'train' plus the eval splits, in the order evals should run.
    info: the module's own facts about the data; num_examples per split,
      num_train_examples (the whole training split), num_group_train_examples
      and steps_per_epoch (this group's) are added.
    group, num_groups, process_index, process_count: who we are.

  Returns:
    The Datasets.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in "
                     f"[0, {process_count})")
  data = config.data
  host_batch_size(data.batch_size, process_count, "batch_size")
  host_batch_size(data.eval_batch_size, process_count, "eval_batch_size")
  train_split = splits["train"]
  shard = partition(np.arange(train_split.size), num_groups, group,
                    data.get("partition", "disjoint"),
                    data.get("split_seed", 0))
  order = TrainOrder(shard, batch_size=data.batch_size, seed=config.seed,
                     group=group, process_index=process_index,
                     process_count=process_count)
  in_memory = isinstance(train_split, ArraySplit)
  train = (_array_train if in_memory else _grain_train)(train_split, order)
  evals = {}
  for name, split in splits.items():
    if name == "train":
      continue
    rows = eval_order(split.size, batch_size=data.eval_batch_size,
                      process_index=process_index, process_count=process_count)
    evals[name] = (_array_eval if isinstance(split, ArraySplit)
                   else _grain_eval)(split, rows)
  info = {
      **info,
      "num_examples": {name: s.size for name, s in splits.items()},
      "num_train_examples": train_split.size,
      "num_group_train_examples": len(shard),
      "steps_per_epoch": order.steps_per_epoch,
  }
  return Datasets(train=train, evals=evals, info=info)

"""Which examples go where: splits, group shards, and the batch order.

A data module only knows how to read its source and turn example indices into
arrays; everything about *which* examples go where lives here, once:

  * `split_indices`: a fixed-seed split of N examples into train / validation /
    test (or any named splits).
  * `partition`: group g's share of the training split ('disjoint' shards that
    cover it exactly, or 'shared': everything, in the group's own order).
  * `TrainOrder`: the examples of this host's rows of the global batch at step
    s, a pure function of (seed, group, s), so a resumed run is seekable.
  * `eval_order`: the split in order, padded to whole global batches, the same
    number of batches on every host.

Randomness here comes from a splitmix64 hash of integer keys instead of
`np.random`: it is a few lines, vectorised, and gives the same splits and
batch orders whatever the numpy version, which matters for a split that a
paper's numbers are measured on.
"""

from __future__ import annotations

import functools
from typing import Mapping

import numpy as np

from codistill_jax.errors import ConfigError

# Distinct tags keep the streams drawn for different purposes independent even
# when the user passes the same seed for all of them.
_SPLIT_TAG = 0x5EED_5B17
_PARTITION_TAG = 0x5EED_9A27
_EPOCH_TAG = 0x5EED_E90C

PARTITION_MODES = ("disjoint", "shared")


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
    raise ConfigError(f"config.codistill.num_groups={num_groups} disjoint shards of only "
                      f"{len(indices)} training examples; use fewer groups or "
                      "config.data.partition='shared'")
  shuffled = indices[permutation(len(indices), seed, _PARTITION_TAG)]
  # Shard g is the g-th of G near-equal contiguous pieces of the shuffle.
  bounds = [len(indices) * g // num_groups for g in range(num_groups + 1)]
  return np.sort(shuffled[bounds[group]:bounds[group + 1]])


# ----------------------------------------------------------------------------
# Which examples make up each batch.
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

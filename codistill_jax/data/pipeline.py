"""From example indices to batches: the `Datasets` a data module returns.

`assemble` glues a module's splits to `order.py`'s group shard and batch
order, either over arrays held in memory (`ArraySplit`, gathered a batch at a
time) or over random-access records (`RecordSplit`, e.g. a tfds ArrayRecord
source, read example by example on grain threads).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from codistill_jax.data import order as order_lib


@dataclasses.dataclass(frozen=True)
class Datasets:
  """What a data module hands the trainer.

  Attributes:
    train: `train(start_step)` iterates over this host's share of the group's
      global batch for steps start_step, start_step + 1, ... (endless).
    evals: split name -> a function returning a fresh, finite, padded iterator
      over that split (every host gets the same number of batches). The
      trainer evaluates the first split every `eval_every` steps and all of
      them at the end, so a module names its splits as it likes ('dev').
    info: facts about the data that a model or the trainer may need
      (num_classes, vocab_size, cardinalities, num_examples, ...).
    train_scan: optional; a fresh, finite, padded iterator over the whole
      training split in split order (every group's examples once), with each
      example's 'index' as in `train`: what a teacher's targets are written
      for (`codistill_jax.tools.store_targets`).
  """
  train: Callable[[int], Iterator[dict]]
  evals: Mapping[str, Callable[[], Iterator[dict]]]
  info: Mapping[str, Any]
  train_scan: Callable[[], Iterator[dict]] | None = None

  @property
  def periodic_split(self) -> str:
    """The split evaluated during training (the first one)."""
    return next(iter(self.evals))


def prefetch_depth(depth: int, devices: Sequence[Any]) -> int:
  """`config.data.prefetch`, with -1 resolved for the devices this process
  drives: 2, or 0 when they are CPU devices at least as many as the host's
  cores (their steps already use every core: a prefetch thread would only
  take turns with them; measured in experiments/bench_loop.py)."""
  if depth >= 0:
    return depth
  cpu = [d for d in devices if d.platform == "cpu"]
  return 0 if cpu and len(cpu) >= (os.cpu_count() or 1) else 2


class Prefetch:
  """Batches prepared and put on the devices ahead of the step, on a thread.

  Iterates `batches` (numpy host batches, e.g. `Datasets.train(step)`, or a
  teacher source's wrapper of it) on a background thread and hands out
  `to_device(batch)` of each, in order, keeping `depth` ready: the loop's
  thread then only dispatches steps. An error of the iterator is raised by
  `__next__` where the batch would have been. `close()` stops and joins the
  thread: a thread still inside XLA when the interpreter exits aborts the
  process ("FATAL: exception not rethrown"), so every owner closes it.
  """

  _END = object()

  def __init__(self, batches: Iterator[dict], to_device: Callable[[dict], Any],
               depth: int = 2):
    """depth: batches kept ready; 0 makes each one in `__next__` (no thread)."""
    import queue  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    self._inline = None
    if not depth:
      self._inline = map(to_device, batches)
      return
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()

    def put(item) -> bool:
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          return True
        except queue.Full:
          continue
      return False

    def fill():
      try:
        for batch in batches:
          if self._stop.is_set() or not put(to_device(batch)):
            return
        put(self._END)
      except BaseException as e:  # pylint: disable=broad-except
        put(e)

    self._thread = threading.Thread(target=fill, daemon=True,
                                    name="prefetch")
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._inline is not None:
      return next(self._inline)
    item = self._queue.get()
    if item is self._END:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self, timeout_s: float = 60.0) -> None:
    """Stops the thread after the batch it is making, and waits for it."""
    if self._inline is not None:
      return
    self._stop.set()
    self._thread.join(timeout_s)


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


def _array_train(split: ArraySplit, order: order_lib.TrainOrder):
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


def _grain_train(split: RecordSplit, order: order_lib.TrainOrder):
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
  order_lib.host_batch_size(data.batch_size, process_count, "batch_size")
  order_lib.host_batch_size(data.eval_batch_size, process_count,
                            "eval_batch_size")
  train_split = splits["train"]
  shard = order_lib.partition(np.arange(train_split.size), num_groups, group,
                              data.get("partition", "disjoint"),
                              data.get("split_seed", 0))
  order = order_lib.TrainOrder(
      shard, batch_size=data.batch_size, seed=config.seed, group=group,
      process_index=process_index, process_count=process_count)
  in_memory = isinstance(train_split, ArraySplit)
  train = (_array_train if in_memory else _grain_train)(train_split, order)

  def in_order(split):
    rows = order_lib.eval_order(
        split.size, batch_size=data.eval_batch_size,
        process_index=process_index, process_count=process_count)
    return (_array_eval if isinstance(split, ArraySplit)
            else _grain_eval)(split, rows)

  evals = {name: in_order(split) for name, split in splits.items()
           if name != "train"}
  if not evals:
    raise ValueError("a data module must give at least one eval split")
  info = {
      **info,
      "num_examples": {name: s.size for name, s in splits.items()},
      "num_train_examples": train_split.size,
      "num_group_train_examples": len(shard),
      "steps_per_epoch": order.steps_per_epoch,
  }
  return Datasets(train=train, evals=evals, info=info,
                  train_scan=in_order(train_split))

"""Synthetic token streams: an LM workload of any size that needs no files.

For compile checks, throughput benchmarks and `:quick` runs of the real-size
LM configs (configs/lm_*.py) on a machine without a corpus. The text is a
fixed random Markov chain over `vocab_size - 1` token ids (0 is padding, never
emitted): every id has `branching` possible successors with Zipf(1)
probabilities, so a model can learn it (the next-token entropy is at most
1.82 nats at branching 8, 2.37 at 16, far below log(vocab)) and
codistilling groups have something to agree on. The chain is drawn from
`config.data.split_seed`; every window starts from its own id, so windows are
independent and the splits are disjoint by construction.

  windows: num_train / num_eval windows of seq_len + 1 ids per split, made
           once at load (vectorised over windows), held in memory.

Config fields (config.data.*): vocab_size, seq_len, num_train, num_eval,
branching, batch_size, eval_batch_size, split_seed, partition.
"""

from __future__ import annotations

import functools

import numpy as np

from codistill_jax.data import lm
from codistill_jax.data import pipeline

PAD = 0
RANGES = {"vocab_size": "> 2", "seq_len": "> 0", "num_train": "> 0",
          "num_eval": "> 0", "branching": "> 0"}
_SPLIT_TAG = {"train": 0, "validation": 1, "test": 2}


def successors(vocab_size: int, branching: int, seed: int):
  """The chain: (successor ids [V, k], their cumulative probabilities)."""
  rng = np.random.default_rng([seed, 0x5EED])
  nxt = rng.integers(1, vocab_size, size=(vocab_size, branching),
                     dtype=np.int32)
  p = 1.0 / np.arange(1, branching + 1)
  return nxt, np.cumsum(p / p.sum())


@functools.lru_cache(maxsize=8)
def windows(vocab_size: int, seq_len: int, count: int, branching: int,
            seed: int, split: str) -> np.ndarray:
  """int32 [count, seq_len + 1] windows of one split (cached per process)."""
  nxt, cdf = successors(vocab_size, branching, seed)
  rng = np.random.default_rng([seed, _SPLIT_TAG[split]])
  out = np.empty((count, seq_len + 1), np.int32)
  out[:, 0] = rng.integers(1, vocab_size, size=count)
  picks = np.searchsorted(cdf, rng.random((count, seq_len)), side="right")
  picks = np.minimum(picks, branching - 1)
  for t in range(seq_len):
    out[:, t + 1] = nxt[out[:, t], picks[:, t]]
  out.setflags(write=False)
  return out


def get_datasets(config, *, group: int, num_groups: int, process_index: int,
                 process_count: int) -> pipeline.Datasets:
  data = config.data
  seed = data.get("split_seed", 0)
  sizes = {"train": data.num_train, "validation": data.num_eval,
           "test": data.num_eval}
  made = {name: windows(data.vocab_size, data.seq_len, n, data.branching,
                        seed, name) for name, n in sizes.items()}
  return lm.window_datasets(
      config, made, vocab_size=data.vocab_size, pad_id=PAD, info={},
      group=group, num_groups=num_groups, process_index=process_index,
      process_count=process_count)

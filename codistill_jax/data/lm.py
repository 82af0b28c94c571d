"""The language-model layout: documents of token ids -> training windows.

Shared by the text pipelines (kernel_docs, english, synthetic_lm, tfds_text).
"""

from __future__ import annotations

import functools

import numpy as np

from codistill_jax.data import pipeline


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


def _gather(windows: np.ndarray, pad_id: int, index: np.ndarray) -> dict:
  return lm_batch(windows[index], pad_id)


def window_datasets(config, windows: dict[str, np.ndarray], *, vocab_size: int,
                    pad_id: int, info: dict, **slot) -> pipeline.Datasets:
  """The `Datasets` of token windows held in memory, one array per split.

  Args:
    config: the experiment config.
    windows: split name -> int [n, L + 1] windows (`lm_windows`).
    vocab_size: the output classes.
    pad_id: the padding id (its targets get weight 0).
    info: the data module's own entries (tokenizer paths, eod_id, ...); the
      shared ones are added: vocab_size, max_len, pad_id, num_tokens (target
      tokens the loss sees, per split) and unigram (the training split's
      target-token counts, a sampling proposal).
    **slot: group, num_groups, process_index, process_count.
  """
  splits = {name: pipeline.ArraySplit(
      len(w), functools.partial(_gather, w, pad_id))
            for name, w in windows.items()}
  info = {
      "vocab_size": vocab_size,
      "max_len": config.data.seq_len,
      "pad_id": pad_id,
      **info,
      "num_tokens": {name: int((w[:, 1:] != pad_id).sum())
                     for name, w in windows.items()},
      "unigram": np.bincount(windows["train"][:, 1:].ravel(),
                             minlength=vocab_size)[:vocab_size],
  }
  return pipeline.assemble(config, splits, info, **slot)

"""The language-model layout: documents of token ids -> training windows.

Shared by the text pipelines (kernel_docs, tfds_text).
"""

from __future__ import annotations

import numpy as np


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

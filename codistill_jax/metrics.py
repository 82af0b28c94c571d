"""Evaluation metrics (device-side sums, host-side summaries) and the writer.

Eval batches are padded; every device-side metric is a weighted *sum* so that
batches can be added up on the host and divided once at the end. AUC needs all
predictions, so binary tasks also return per-example probabilities.
"""

import json
import os
import sys
import time
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from codistill_jax import losses


def eval_metrics_fn(task_loss: str):
  """Returns `metrics_fn(logits, batch) -> dict` of sums for `eval_step`."""

  def softmax_metrics(logits, batch):
    labels, w = batch["labels"], batch["weights"]
    xent = losses.softmax_xent(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    out = {"loss_sum": jnp.sum(xent * w), "correct_sum": jnp.sum(correct * w),
           "weight_sum": jnp.sum(w)}
    if labels.ndim > 1:  # Sequences: the loss is per token; add perplexity.
      out["token_sum"] = jnp.sum(w)
    return out

  def sigmoid_metrics(logits, batch):
    labels, w = batch["labels"], batch["weights"]
    return {"loss_sum": jnp.sum(losses.sigmoid_xent(logits, labels) * w),
            "weight_sum": jnp.sum(w),
            "probs": jax.nn.sigmoid(logits.astype(jnp.float32)),
            # Global labels/weights: a host's own batch is only its slice.
            "labels": labels, "weights": w}

  return {"softmax_xent": softmax_metrics,
          "sigmoid_xent": sigmoid_metrics}[task_loss]


class EvalAccumulator:
  """Adds up per-batch eval outputs on the host; `summary()` gives metrics."""

  def __init__(self, task_loss: str):
    self.task_loss = task_loss
    self.sums: dict[str, float] = {}
    self.probs, self.labels, self.weights = [], [], []

  def add(self, out: Mapping[str, Any]):
    out = jax.device_get(out)
    for k, v in out.items():
      if k.endswith("_sum"):
        self.sums[k] = self.sums.get(k, 0.0) + float(v)
    if "probs" in out:
      self.probs.append(np.asarray(out["probs"]).reshape(-1))
      self.labels.append(np.asarray(out["labels"]).reshape(-1))
      self.weights.append(np.asarray(out["weights"]).reshape(-1))

  def summary(self) -> dict[str, float]:
    n = max(self.sums.get("weight_sum", 0.0), 1e-12)
    loss = self.sums["loss_sum"] / n
    if self.task_loss == "sigmoid_xent":
      probs, labels, weights = (np.concatenate(a) for a in
                                (self.probs, self.labels, self.weights))
      keep = weights > 0
      return {"log_loss": loss, "auc": auc(labels[keep], probs[keep])}
    res = {"loss": loss, "accuracy": self.sums["correct_sum"] / n}
    if "token_sum" in self.sums:
      res["perplexity"] = float(np.exp(min(loss, 50.0)))
    return res


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
  labels = np.asarray(labels) > 0.5
  n_pos, n_neg = labels.sum(), (~labels).sum()
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = np.asarray(scores)[order]
  ranks = np.empty(len(scores), np.float64)
  # Average rank over each run of tied scores.
  _, first, counts = np.unique(sorted_scores, return_index=True,
                               return_counts=True)
  avg = first + (counts + 1) / 2.0
  ranks[order] = np.repeat(avg, counts)
  u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


class Progress:
  """One log line every `every_s` seconds of a long loop: done / total, ETA."""

  def __init__(self, what: str, total: int | None, every_s: float = 10.0):
    self.what, self.total, self.every_s = what, total, every_s
    self.done, self._t0 = 0, time.time()
    self._last = self._t0

  def tick(self, n: int = 1) -> None:
    self.done += n
    now = time.time()
    if now - self._last < self.every_s:
      return
    self._last = now
    rate = self.done / max(now - self._t0, 1e-9)
    if self.total:
      eta = time.strftime("%H:%M:%S", time.gmtime(
          (self.total - self.done) / max(rate, 1e-9)))
      logging.info("%s: %d/%d batches (%.0f%%), ETA %s", self.what,
                   self.done, self.total, 100 * self.done / self.total, eta)
    else:
      logging.info("%s: %d batches (%.1f/s)", self.what, self.done, rate)


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX's writer imports torch whenever it is installed (for
  `isinstance` checks we never need): seconds of start-up, and a job that
  holds both torch's and XLA's runtimes aborts at exit after SIGTERM or
  Ctrl-C. `sys.modules['torch'] = None` makes that import fail for the
  moment of ours; torch stays importable afterwards.
  """
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if blocked:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """TensorBoard events (tensorboardX) plus a JSONL file of every metric.

  Only the process that is asked to write (process 0 of a job) writes; others
  get a writer that does nothing, so callers need no branches.
  """

  def __init__(self, logdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if enabled:
      os.makedirs(logdir, exist_ok=True)
      # A deep queue: its writer thread dies silently on a full disk, and a
      # full queue would then block the loop before the next save says so.
      self._tb = _summary_writer()(logdir, flush_secs=10, max_queue=4096)
      path = os.path.join(logdir, "metrics.jsonl")
      _drop_torn_line(path)
      # O_APPEND and one write per line: a row is whole or absent.
      self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

  def write(self, step: int, scalars: Mapping[str, Any]):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    line = json.dumps({"step": int(step), "time": time.time(), **scalars})
    # The JSONL row first: a full disk raises here, at once. TensorBoard's
    # writer thread dies silently on one, and its bounded queue then blocks
    # add_scalar for ever.
    os.write(self._fd, (line + "\n").encode())
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)

  def close(self):
    if self.enabled:
      self._tb.close()
      os.close(self._fd)


def _drop_torn_line(path: str) -> None:
  """Cuts a last line a killed writer left half-written (no newline)."""
  try:
    with open(path, "rb+") as f:
      data = f.read()
      if data and not data.endswith(b"\n"):
        f.truncate(data.rfind(b"\n") + 1)
        logging.warning("%s: dropped a torn last line left by a killed run",
                        path)
  except FileNotFoundError:
    pass


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Reads a metrics.jsonl file written by `MetricWriter`.

  A torn last line (the writer was killed mid-line) is skipped with a
  warning; a bad line anywhere else is corruption and raises, naming it.
  """
  with open(path) as f:
    lines = [line for line in f.read().split("\n") if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except ValueError:
      if i < len(lines) - 1:
        raise ValueError(f"{path}:{i + 1} is not a JSON line") from None
      logging.warning("%s: skipping a torn last line (%d bytes)", path,
                      len(line))
  return rows


# Metrics of a distillation term that mean nothing before a teacher is held:
# log steps average them over the updates that had one, or leave them out.
TEACHER_METRICS = ("distill_loss", "peer_agreement", "peer_abs_diff")


def window_means(stacked: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Per-metric means over a log window of per-step device metrics."""
  held = stacked.get("teacher_held")
  out = {}
  for k, v in stacked.items():
    v = np.asarray(v)
    if k == "teacher_held":
      continue
    if held is not None and k in TEACHER_METRICS:
      mask = np.asarray(held) > 0
      if mask.any():
        out[k] = float(np.mean(v[mask]))
      continue
    out[k] = float(np.mean(v))
  return out


# ----------------------------------------------------------------------------
# Comparing models: ensembles, agreement between groups, churn of retrains.
# ----------------------------------------------------------------------------
def predictions_fn(task_loss: str):
  """Returns `fn(logits, batch)`: what comparing models needs, per example.

  'label_prob' (probability of the true label), 'weights', and for binary
  outputs 'prob'; for softmax outputs 'pred' (top-1) and, when the output is a
  class vector rather than a sequence, the full 'probs'.
  """

  def fn(logits, batch):
    logits = logits.astype(jnp.float32)
    labels, w = batch["labels"], batch["weights"]
    if task_loss == "sigmoid_xent":
      p = jax.nn.sigmoid(logits)
      return {"prob": p, "label_prob": jnp.where(labels > 0.5, p, 1 - p),
              "labels": labels, "weights": w}
    probs = jax.nn.softmax(logits, -1)
    out = {"label_prob": jnp.take_along_axis(probs, labels[..., None],
                                             -1)[..., 0],
           "pred": jnp.argmax(logits, -1), "labels": labels, "weights": w}
    if logits.ndim == 2:
      out["probs"] = probs
    return out

  return fn


class ComparisonAccumulator:
  """Accumulates per-model predictions on the same eval batches.

  `summary()` gives the ensemble's metrics (mean of the models'
  probabilities) and the mean pairwise disagreement: top-1 disagreement for
  softmax outputs, mean |p_i - p_j| for one sigmoid output (the churn measure
  of Anil et al. for CTR).
  """

  def __init__(self, task_loss: str):
    self.binary = task_loss == "sigmoid_xent"
    self.batches: list[list[dict]] = []

  def add(self, per_model: list[dict]) -> None:
    self.batches.append([jax.device_get(p) for p in per_model])

  def summary(self) -> dict[str, float]:
    def cat(key, m):  # Model m's `key` over all batches, one row a position.
      arrays = [np.asarray(b[m][key]) for b in self.batches]
      if key == "probs":  # [b, classes]
        return np.concatenate(arrays)
      return np.concatenate([a.reshape(-1) for a in arrays])

    n = len(self.batches[0])
    w = cat("weights", 0)
    keep = w > 0
    label_prob = np.mean([cat("label_prob", m) for m in range(n)], 0)
    out = {"ensemble/loss": float(np.sum(
        -np.log(np.maximum(label_prob, 1e-12)) * w) / max(w.sum(), 1e-12))}
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if self.binary:
      probs = [cat("prob", m) for m in range(n)]
      labels = cat("labels", 0)
      out["ensemble/auc"] = auc(labels[keep], np.mean(probs, 0)[keep])
      out["churn/mean_abs_diff"] = float(np.mean([
          np.average(np.abs(probs[i] - probs[j]), weights=w) for i, j in pairs
      ])) if pairs else 0.0
    else:
      if "probs" not in self.batches[0][0]:  # Sequences.
        out["ensemble/perplexity"] = float(
            np.exp(min(out["ensemble/loss"], 50)))
      preds = [cat("pred", m) for m in range(n)]
      out["churn/top1_disagreement"] = float(np.mean([
          np.average(preds[i] != preds[j], weights=w) for i, j in pairs
      ])) if pairs else 0.0
      if "probs" in self.batches[0][0]:
        labels = cat("labels", 0)
        mean_probs = np.mean([cat("probs", m) for m in range(n)], 0)
        correct = np.argmax(mean_probs, -1) == labels
        out["ensemble/accuracy"] = float(np.average(correct, weights=w))
    return out


@jax.jit
def stack_window(window: list[dict]) -> dict:
  """A log window's per-step device metrics, stacked in one dispatch.

  (Op by op, jnp.stack of 50 steps x 10 metrics is ~500 dispatches: 5% of
  the loop's host time for a 2-group MLP in a py-spy profile.)
  """
  return jax.tree.map(lambda *x: jnp.stack(x), *window)


def check_finite(config, step: int, stacked: dict, last_saved: int | None,
                  g: int) -> None:
  """Stops on the first update whose metrics are not finite, naming the knob.

  Args:
    config: the run's config (the fix names its values).
    step: the step of the newest update in `stacked`.
    stacked: per-update metrics, each [n] for the n newest updates.
    last_saved: the newest committed own checkpoint (every one is finite).
    g: the group.
  """
  rows = {k: np.atleast_1d(np.asarray(v, np.float64)) for k, v in
          stacked.items()}
  bad_rows = np.flatnonzero(~np.all([np.isfinite(v) for v in rows.values()],
                                    axis=0))
  if not bad_rows.size:
    return
  i = int(bad_rows[0])
  first = step - len(next(iter(rows.values()))) + i + 1
  bad = {k: float(v[i]) for k, v in rows.items() if not np.isfinite(v[i])}
  cd, opt = config.codistill, config.optimizer
  if "distill_loss" in bad and "task_loss" not in bad:
    fix = (f"lower config.codistill.alpha (now {cd.alpha}) or bring "
           f"config.codistill.temperature (now {cd.temperature}) nearer 1")
  else:
    fix = (f"lower config.optimizer.learning_rate (now "
           f"{opt.learning_rate}) or set config.optimizer.grad_clip_norm "
           f"(now {opt.grad_clip_norm})")
  raise FloatingPointError(
      f"group {g}: {bad} at step {first}; the last good checkpoint is step "
      f"{last_saved}; {fix}, and rerun with a new --workdir "
      "(config.init_checkpoint=<this workdir> starts from its params)")

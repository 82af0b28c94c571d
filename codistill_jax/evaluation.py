"""Evaluation of the groups a job drives: each alone, then their ensemble."""

import itertools

from absl import logging

from codistill_jax import mesh as mesh_lib
from codistill_jax import metrics as metrics_lib


def evaluate(config, run: list, split: str) -> dict[int | str, dict[str, float]]:
  """Each group's metrics on `split`, then (for several groups) their
  ensemble's and how much they disagree, keyed by group index and 'groups'.

  `run` holds the loop's `train.Group`s (datasets, params, eval and predict
  steps, batch sharding); every group reads the same batches in order.
  """
  examples = run[0].datasets.info.get("num_examples", {}).get(split)
  full = -(-examples // config.data.eval_batch_size) if examples else None
  cap = config.eval_max_batches or None
  n = min(full, cap) if full and cap else cap or full
  passes = len(run) + (len(run) > 1)  # Each group, then the comparison.
  progress = metrics_lib.Progress(f"eval {split}", n and n * passes)
  capped = {f"{split}/batches": n} if cap and full and cap < full else {}
  if capped:
    logging.warning("eval %s: %d of its %d batches (config."
                    "eval_max_batches)", split, n, full)

  def batches(grp):
    return itertools.islice(grp.datasets.evals[split](), n)

  out = {}
  for grp in run:
    acc = metrics_lib.EvalAccumulator(config.loss)
    for batch in batches(grp):
      acc.add(grp.eval_step(grp.state.params,
                            mesh_lib.shard_batch(batch, grp.batch_sharding)))
      progress.tick()
    out[grp.index] = {**{f"{split}/{k}": v for k, v in
                         acc.summary().items()}, **capped}
  if len(run) > 1:
    acc = metrics_lib.ComparisonAccumulator(config.loss)
    for same in zip(*map(batches, run)):  # Same split, same order.
      acc.add([grp.predict_step(grp.state.params, mesh_lib.shard_batch(
          b, grp.batch_sharding)) for grp, b in zip(run, same)])
      progress.tick()
    out["groups"] = {**{f"{split}/{k}": v for k, v in
                        acc.summary().items()}, **capped}
  return out

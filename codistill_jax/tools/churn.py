r"""Churn between two trained runs (or two groups of one run), as a command.

Churn (Anil et al. 2018) is how much the predictions of two retrains of the
same configuration differ: mean |p_a - p_b| of the predicted probabilities for
a sigmoid output (CTR), top-1 disagreement for softmax outputs. Also reported:
each model's own metrics and those of their 2-model ensemble.

  python -m codistill_jax.tools.churn --run_a=/tmp/seed0 --run_b=/tmp/seed1 \
      [--group_a=0] [--group_b=0] [--split=test] [--out=churn.json]

Both runs must share the data config (the eval split is rebuilt from run a's
config.json); the models may differ in seed or training method but not in
architecture.
"""

import json
import os

from absl import flags
import jax
import ml_collections

from codistill_jax import build
from codistill_jax import checkpoint as ckpt_lib
from codistill_jax import cli
from codistill_jax import data as data_lib
from codistill_jax import mesh as mesh_lib
from codistill_jax import metrics as metrics_lib
from codistill_jax import paths
from codistill_jax.errors import ConfigError

_RUN_A = flags.DEFINE_string("run_a", None, "Workdir of the first run.")
_RUN_B = flags.DEFINE_string("run_b", None, "Workdir of the second run.")
_GROUP_A = flags.DEFINE_integer("group_a", 0, "Group of run a.")
_GROUP_B = flags.DEFINE_integer("group_b", 0, "Group of run b.")
_SPLIT = flags.DEFINE_string("split", "test", "Eval split.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON file for the result.")


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = paths.config_file(workdir)
  if not os.path.exists(path):
    raise ConfigError(f"{path} not found: --run_a/--run_b must be workdirs of "
                      "codistill_jax runs")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is unreadable or not JSON ({e}); is the run "
                      "dir damaged?") from None


def compare(config: ml_collections.ConfigDict, params: list, split: str,
            mesh=None) -> dict[str, float]:
  """Each model's metrics, their ensemble's, and churn between them."""
  mesh = mesh or mesh_lib.make_mesh(jax.devices()[:1])
  datasets = data_lib.get_module(config.data.name).get_datasets(
      config, group=0, num_groups=1, process_index=0, process_count=1)
  if split not in datasets.evals:
    raise ConfigError(f"--split={split} is not one of {sorted(datasets.evals)}")
  setup = build.build(config, datasets, mesh)
  sharding = mesh_lib.batch_sharding(mesh)
  predict = build.jit_eval_step(config, setup, predictions=True)
  evaluate = build.jit_eval_step(config, setup)
  comparison = metrics_lib.ComparisonAccumulator(config.loss)
  singles = [metrics_lib.EvalAccumulator(config.loss) for _ in params]
  for batch in datasets.evals[split]():
    batch = mesh_lib.shard_batch(batch, sharding)
    comparison.add([predict(p, batch) for p in params])
    for acc, p in zip(singles, params):
      acc.add(evaluate(p, batch))
  out = {f"{split}/{k}": v for k, v in comparison.summary().items()}
  for i, acc in enumerate(singles):
    out.update({f"{split}/model_{i}/{k}": v for k, v in acc.summary().items()})
  return out


def restore_group_params(config, workdir: str, group: int, mesh=None):
  """The newest own checkpoint's params of `group` in `workdir`."""
  mesh = mesh or mesh_lib.make_mesh(jax.devices()[:1])
  datasets = data_lib.get_module(config.data.name).get_datasets(
      config, group=0, num_groups=1, process_index=0, process_count=1)
  setup = build.build(config, datasets, mesh)
  return ckpt_lib.restore_params(paths.checkpoints_dir(workdir, group),
                                 setup.abstract.params,
                                 field=f"--run (group {group})")


def main(argv):
  del argv
  config = load_run_config(_RUN_A.value)
  other = load_run_config(_RUN_B.value)
  if config.model.to_dict() != other.model.to_dict() or (
      config.model_name != other.model_name):
    raise ConfigError("--run_a and --run_b hold different architectures; "
                      "churn compares retrains of one model")
  params = [restore_group_params(config, _RUN_A.value, _GROUP_A.value),
            restore_group_params(config, _RUN_B.value, _GROUP_B.value)]
  result = compare(config, params, _SPLIT.value)
  for k, v in sorted(result.items()):
    print(f"{k:45s} {v:.6f}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  cli.run(main, required=("run_a", "run_b"))

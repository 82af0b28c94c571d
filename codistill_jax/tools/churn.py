r"""Churn between two trained runs (or two groups of one run), as a command.

Churn (Anil et al. 2018) is how much the predictions of two retrains of the
same configuration differ: mean |p_a - p_b| of the predicted probabilities for
a sigmoid output (CTR), top-1 disagreement for softmax outputs. Also reported:
each model's own metrics and those of their 2-model ensemble.

  python -m codistill_jax.tools.churn --run_a=/tmp/seed0 --run_b=/tmp/seed1 \
      [--group_a=0] [--group_b=0] [--split=test] [--out=churn.json]

Both runs must share the data and the loss (the eval split is rebuilt from
run a's config.json); the models may differ in seed or training method but
not in architecture. Everything is checked before anything is computed or
written (one `error:` line, exit code 2): both runs are run directories, each
`--group_*` is a group of its run with a committed checkpoint, `--split` is
one of the data's eval splits, and `--out` can be written (a file, replaced
if it exists).
"""

import json

from absl import flags
import ml_collections

from codistill_jax import cli
from codistill_jax import paths
from codistill_jax.errors import ConfigError

_RUN_A = flags.DEFINE_string("run_a", None, "Workdir of the first run.")
_RUN_B = flags.DEFINE_string("run_b", None, "Workdir of the second run.")
_GROUP_A = flags.DEFINE_integer("group_a", 0, "Group of run a.")
_GROUP_B = flags.DEFINE_integer("group_b", 0, "Group of run b.")
_SPLIT = flags.DEFINE_string("split", "test", "Eval split.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON file for the result.")


def load_run_config(workdir: str, flag: str = "--run_a/--run_b"
                    ) -> ml_collections.ConfigDict:
  """The config of the run at `workdir` (ConfigError if it is none)."""
  return cli.check_run(workdir, flag)


def _datasets(config):
  # pylint: disable-next=g-import-not-at-top
  from codistill_jax import data as data_lib
  return data_lib.get_module(config.data.name).get_datasets(
      config, group=0, num_groups=1, process_index=0, process_count=1)


def _check_split(datasets, split: str) -> None:
  if split not in datasets.evals:
    raise ConfigError(f"--split={split} is not one of {sorted(datasets.evals)}")


def compare(config: ml_collections.ConfigDict, params: list, split: str,
            mesh=None, datasets=None) -> dict[str, float]:
  """Each model's metrics, their ensemble's, and churn between them."""
  # Imported here: the command's checks of its flags do not pay for JAX.
  # pylint: disable=g-import-not-at-top
  import jax
  from codistill_jax import build
  from codistill_jax import mesh as mesh_lib
  from codistill_jax import metrics as metrics_lib
  # pylint: enable=g-import-not-at-top
  mesh = mesh or mesh_lib.make_mesh(jax.devices()[:1])
  datasets = datasets or _datasets(config)
  _check_split(datasets, split)
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


def restore_group_params(config, workdir: str, group: int, mesh=None,
                         datasets=None, flag: str = "--run"):
  """The newest own checkpoint's params of `group` in `workdir`."""
  # pylint: disable=g-import-not-at-top
  import jax
  from codistill_jax import build
  from codistill_jax import checkpoint as ckpt_lib
  from codistill_jax import mesh as mesh_lib
  # pylint: enable=g-import-not-at-top
  mesh = mesh or mesh_lib.make_mesh(jax.devices()[:1])
  setup = build.build(config, datasets or _datasets(config), mesh)
  return ckpt_lib.restore_params(paths.checkpoints_dir(workdir, group),
                                 setup.abstract.params,
                                 field=f"{flag} (group {group})")


def check(runs: list[tuple[str, str, int, str]]) -> ml_collections.ConfigDict:
  """Checks [(workdir, its flag, group, its flag)]; returns the first's config.

  Reads only the runs' config.json files: no JAX.
  """
  configs = []
  for workdir, flag, group, group_flag in runs:
    config = load_run_config(workdir, flag)
    cli.check_group(group, config.codistill.num_groups, group_flag,
                    f"{flag}={workdir}")
    configs.append(config)
  a, b = configs[0], configs[-1]
  if (a.model_name, a.model.to_dict()) != (b.model_name, b.model.to_dict()):
    raise ConfigError("--run_a and --run_b hold different architectures "
                      f"({a.model_name} {a.model.to_dict()} vs {b.model_name} "
                      f"{b.model.to_dict()}); churn compares retrains of one "
                      "model")
  if (a.data.get("name"), a.get("loss")) != (b.data.get("name"), b.get("loss")):
    raise ConfigError("--run_a and --run_b were trained on other data or "
                      f"losses ({a.data.get('name')}/{a.get('loss')} vs "
                      f"{b.data.get('name')}/{b.get('loss')}); churn compares "
                      "predictions on one eval split")
  return a


def main(argv):
  del argv
  runs = [(_RUN_A.value, "--run_a", _GROUP_A.value, "--group_a"),
          (_RUN_B.value, "--run_b", _GROUP_B.value, "--group_b")]
  config = check(runs)
  if _OUT.value:
    cli.check_output(_OUT.value, "--out")
  # pylint: disable-next=g-import-not-at-top
  from codistill_jax import checkpoint as ckpt_lib
  for workdir, flag, group, _ in runs:  # Reads nothing but the directories.
    ckpt_lib.find_step_dir(paths.checkpoints_dir(workdir, group),
                           f"{flag} (group {group})")
  datasets = _datasets(config)
  _check_split(datasets, _SPLIT.value)
  params = [restore_group_params(config, workdir, group, datasets=datasets,
                                 flag=flag)
            for workdir, flag, group, _ in runs]
  result = compare(config, params, _SPLIT.value, datasets=datasets)
  for k, v in sorted(result.items()):
    print(f"{k:45s} {v:.6f}")
  if _OUT.value:
    try:
      with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=2)
    except OSError as e:
      raise ConfigError(f"--out={_OUT.value}: cannot write it "
                        f"({e.strerror}); name a writable file") from None


if __name__ == "__main__":
  cli.run(main, required=("run_a", "run_b"), output="--out")

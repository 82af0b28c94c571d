"""2-D ('data', 'model') sub-meshes: layout, equivalence to 1-D, resharding.

The LM configs' rules split attention heads, the MLP's hidden units and the
output vocabulary over 'model' and every matrix over 'data' (FSDP). On 8 fake
CPU devices: 2 groups of 2 x 2 train like 2 groups of 4 x 1, and a checkpoint
written on 2 x 2 resumes on 4 x 1.
"""

import glob
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from codistill_jax import build
from codistill_jax import checkpoint
from codistill_jax import data as data_lib
from codistill_jax import mesh as mesh_lib
from codistill_jax import paths
from codistill_jax import train
from codistill_jax.errors import ConfigError
from tests.test_train import load_config, restore_params


def lm(model_axis=1, groups=2, **overrides):
  config = load_config("lm", f"quick,groups={groups}")
  config.sharding.model_axis = model_axis
  config.codistill.exchange_blocking = True  # Exact staleness: comparable.
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def test_rules_lay_the_lm_over_data_and_model():
  config = lm(model_axis=2, groups=1)
  mesh = mesh_lib.make_mesh(jax.devices()[:4], 2)
  assert dict(mesh.shape) == {"data": 2, "model": 2}
  datasets = data_lib.get_module(config.data.name).get_datasets(
      config, group=0, num_groups=1, process_index=0, process_count=1)
  setup = build.build(config, datasets, mesh)
  specs = {mesh_lib.path_str(p): s.spec for p, s in
           jax.tree_util.tree_flatten_with_path(setup.state_sharding)[0]}
  layers = "params/params/layers"
  # [layers, embed, heads, head_dim]: FSDP over embed, heads over 'model'.
  assert specs[f"{layers}/attn/query/kernel"] == P(None, "data", "model",
                                                   None)
  assert specs[f"{layers}/attn/out/kernel"] == P(None, "model", None, "data")
  assert specs[f"{layers}/mlp/gate/kernel"] == P(None, "data", "model")
  assert specs[f"{layers}/mlp/down/kernel"] == P(None, "model", "data")
  # The output layer: its input width over 'model', its vocabulary over
  # 'data' (and the embedding's vocabulary: see configs/lm.py).
  assert specs["params/params/head/kernel"] == P("model", "data")
  assert specs["params/params/embed/embedding"] == P("data", None)
  # Adam's moments follow their parameter.
  mu = [s for n, s in specs.items() if n.endswith("mu/params/layers/attn/"
                                                 "query/kernel")]
  assert mu == [specs[f"{layers}/attn/query/kernel"]]
  # The same rules on a 1-D mesh: 'model' means nothing there.
  flat = build.build(config, datasets, mesh_lib.make_mesh(jax.devices()[:4]))
  query = [s.spec for p, s in jax.tree_util.tree_flatten_with_path(
      flat.state_sharding)[0] if mesh_lib.path_str(p) ==
           f"{layers}/attn/query/kernel"]
  assert query == [P(None, "data", None, None)]


def test_a_model_axis_that_does_not_divide_the_heads_is_a_config_error():
  config = lm(model_axis=8, groups=1)  # 4 heads.
  mesh = mesh_lib.make_mesh(jax.devices(), 8)
  datasets = data_lib.get_module(config.data.name).get_datasets(
      config, group=0, num_groups=1, process_index=0, process_count=1)
  with pytest.raises(ConfigError, match=r"model_axis=8 does not divide"):
    build.build(config, datasets, mesh)
  with pytest.raises(ConfigError, match=r"model_axis=3 does not divide the 4"):
    mesh_lib.check_config(lm(model_axis=3), num_devices=8)


def _final_params(workdir, step):
  return [restore_params(str(workdir), step, g) for g in (0, 1)]


def _close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3,
                               atol=1e-4)


@pytest.mark.slow  # Three 2-group LM runs.
def test_2x2_groups_train_like_4x1_and_reshard_on_resume(tmp_path):
  steps = 6
  flat, square, resumed = (tmp_path / n for n in ("4x1", "2x2", "resumed"))
  kw = {"total_steps": steps, "checkpoint_every": 3}
  train.train_and_evaluate(lm(1, **kw), str(flat))
  train.train_and_evaluate(lm(2, **kw), str(square))
  _close(_final_params(flat, steps), _final_params(square, steps))

  # The 2 x 2 run, cut back to its step-3 checkpoint (own state and what it
  # published after it), resumed on 4 x 1: the same result.
  shutil.copytree(square, resumed)
  config = lm(2, **kw)
  run = paths.run_dir(str(resumed), checkpoint.run_identity(config))
  for g in (0, 1):
    shutil.rmtree(os.path.join(paths.checkpoints_dir(str(resumed), g),
                               str(steps)))
    for path in glob.glob(os.path.join(paths.published_dir(run, g), "*")):
      if not os.path.basename(path).startswith("3"):
        (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
  assert checkpoint.committed_steps(
      paths.checkpoints_dir(str(resumed), 0)) == [3]
  train.train_and_evaluate(lm(1, **kw), str(resumed))
  _close(_final_params(square, steps), _final_params(resumed, steps))

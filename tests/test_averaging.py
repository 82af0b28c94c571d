"""Parameter averaging (local SGD / DiLoCo) on the codistillation exchange."""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from codistill_jax import averaging
from codistill_jax import build
from codistill_jax import data as data_lib
from codistill_jax import losses
from codistill_jax import mesh as mesh_lib
from codistill_jax import metrics
from codistill_jax import step as step_lib
from codistill_jax import train
from codistill_jax.errors import ConfigError
from tests.test_codistill import codistill_config
from tests.test_train import restore_params


def _state(params, tx):
  return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params),
                             rng=jnp.zeros((2,), jnp.uint32))


def test_outer_sgd_at_lr_1_sets_every_group_to_the_mean():
  tx = averaging.with_outer(optax.sgd(0.1), optax.sgd(1.0))
  anchor = {"w": jnp.zeros((3,)), "b": jnp.ones(())}
  state = _state(anchor, tx).replace(params={"w": jnp.array([1., 2., 3.]),
                                             "b": jnp.array(3.)})
  peers = step_lib.Teachers(
      params={"w": jnp.array([[3., 2., 1.], [100., 100., 100.]]),
              "b": jnp.array([5., 100.])},
      weights=jnp.array([1., 0.]))  # The second slot holds nothing yet.
  out = averaging.make_outer_step(optax.sgd(1.0))(state, peers)
  np.testing.assert_allclose(out.params["w"], [2., 2., 2.])
  np.testing.assert_allclose(out.params["b"], 4.)
  np.testing.assert_allclose(out.opt_state.anchor["w"], [2., 2., 2.])
  # The inner optimizer's state is the inner optimizer's alone.
  assert jax.tree.structure(out.opt_state.inner) == jax.tree.structure(
      optax.sgd(0.1).init(anchor))


def test_nesterov_outer_step_matches_optax_on_the_mean_delta():
  outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
  tx = averaging.with_outer(optax.sgd(0.1), outer)
  anchor = {"w": jnp.array([1., -1.])}
  state = _state(anchor, tx)
  step = averaging.make_outer_step(outer)
  expect_anchor, expect_outer = anchor, outer.init(anchor)
  for own, peer in (([2., 0.], [0., 0.]), ([1., 1.], [3., -3.])):
    state = state.replace(params={"w": jnp.array(own)})
    peers = step_lib.Teachers({"w": jnp.array([peer])}, jnp.ones((1,)))
    state = step(state, peers)
    delta = {"w": expect_anchor["w"] - (jnp.array(own) + jnp.array(peer)) / 2}
    upd, expect_outer = outer.update(delta, expect_outer, expect_anchor)
    expect_anchor = optax.apply_updates(expect_anchor, upd)
    np.testing.assert_allclose(state.params["w"], expect_anchor["w"],
                               rtol=1e-6)


def _averaging_config(**overrides):
  config = codistill_config(**{
      "codistill.method": "average", "codistill.exchange_every": 1,
      "codistill.burn_in_steps": 0, "optimizer.name": "sgd",
      "optimizer.schedule": "constant", "optimizer.learning_rate": 0.05,
      "codistill.averaging.outer_optimizer": "sgd",
      "codistill.averaging.outer_learning_rate": 1.0,
      "total_steps": 6, "checkpoint_every": 6, "eval_every": 6,
      **overrides})
  return config


@pytest.mark.slow
def test_h1_outer_lr1_equals_sync_sgd_over_the_union_of_batches(tmp_path):
  """The trainer's averaging (2 groups, H = 1, outer SGD lr 1, inner SGD)
  against synchronous SGD, written here, on the two groups' batches
  concatenated: the same params after every step, within rounding."""
  config = _averaging_config()
  train.train_and_evaluate(config, str(tmp_path))
  got = [restore_params(str(tmp_path), 6, group=g) for g in (0, 1)]
  # Both groups end on the same (averaged) params.
  for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(got[1])):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)

  # The reference: one model, the same init (group 0's seed), and at each
  # step the mean gradient of group 0's and group 1's batches.
  module = data_lib.get_module(config.data.name)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  streams, setup = [], None
  for g in (0, 1):
    ds = module.get_datasets(config, group=g, num_groups=2, process_index=0,
                             process_count=1)
    streams.append(iter(ds.train(0)))
    setup = setup or build.build(config, ds, mesh)
  params = jax.jit(setup.init_fn)(jax.random.fold_in(
      jax.random.PRNGKey(config.seed), 0)).params
  loss_fn = step_lib.make_loss_fn(losses.task_loss(config.loss))

  def loss(p, batch):
    return loss_fn(setup.model.apply(p, batch["inputs"], train=False),
                   batch)[0]

  grad = jax.jit(jax.grad(loss))
  for _ in range(config.total_steps):
    g0, g1 = (grad(params, next(s)) for s in streams)
    params = jax.tree.map(lambda p, a, b: p - 0.05 * (a + b) / 2, params, g0,
                          g1)
  for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("synchronous", [True, False])
def test_averaging_logs_drift_and_is_not_distillation(tmp_path, synchronous):
  config = _averaging_config(**{
      "codistill.exchange_every": 3, "total_steps": 12,
      "codistill.averaging.synchronous": synchronous})
  train.train_and_evaluate(config, str(tmp_path))
  rows = [r for r in metrics.read_jsonl(
      str(tmp_path / "group_0" / "metrics.jsonl")) if "loss" in r]
  assert not any("distill_loss" in r for r in rows)
  by_step = {r["step"]: r for r in rows}
  # Measured at each average: groups on different data drift apart between
  # averages. Synchronous: with the peer's params of the same step, from the
  # first average on; asynchronous: with the newest held, restored in the
  # background (none held at the first average, so only later ones).
  averaged = [s for s in (3, 6, 9, 12) if by_step[s]["averaging/peers"]]
  assert averaged == ([3, 6, 9, 12] if synchronous else averaged) and (
      len(averaged) >= 2)
  assert all(by_step[s]["averaging/drift"] > 0 for s in averaged)
  final = [restore_params(str(tmp_path), 12, group=g) for g in (0, 1)]
  same = all(np.array_equal(a, b) for a, b in zip(*map(jax.tree.leaves,
                                                       final)))
  # Synchronous averaging leaves the groups equal after every average.
  assert same == synchronous


@pytest.mark.slow
def test_resume_continues_the_outer_state_exactly(tmp_path):
  """The anchor and the outer momentum are in the checkpoint: a run resumed
  from its step-4 checkpoint ends where the uninterrupted one did."""
  config = _averaging_config(**{
      "codistill.exchange_every": 2, "checkpoint_every": 2,
      "codistill.averaging.outer_optimizer": "nesterov",
      "codistill.averaging.outer_learning_rate": 0.7,
      "optimizer.name": "adamw"})
  whole = tmp_path / "whole"
  train.train_and_evaluate(config, str(whole))
  ends = [restore_params(str(whole), 6, group=g) for g in (0, 1)]
  # Take steps 5 and 6 back (own checkpoints and published params).
  for g in (0, 1):
    shutil.rmtree(whole / f"group_{g}" / "checkpoints" / "6")
  for blob in glob.glob(str(whole / "runs" / "*" / "group_*" / "published" /
                            "6*")):
    (shutil.rmtree if os.path.isdir(blob) else os.remove)(blob)
  train.train_and_evaluate(config, str(whole))  # Resumes from step 4.
  for g in (0, 1):
    for x, y in zip(jax.tree.leaves(ends[g]), jax.tree.leaves(
        restore_params(str(whole), 6, group=g))):
      np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("field,value,match", [
    ("codistill.method", "mean", "codistill.method"),
    ("codistill.averaging.outer_optimizer", "adam",
     "codistill.averaging.outer_optimizer"),
    ("codistill.averaging.outer_learning_rate", 0.0,
     "codistill.averaging.outer_learning_rate"),
    ("codistill.teacher_source", "checkpoint", "codistill.method"),
])
def test_bad_averaging_config_writes_nothing(tmp_path, field, value, match):
  config = _averaging_config(**{field: value})
  with pytest.raises(ConfigError, match=match):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()

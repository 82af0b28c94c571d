"""Losses, metrics, mesh rules, optimizer and config helpers (no training)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codistill_jax import cadence
from codistill_jax import config_lib
from codistill_jax import losses
from codistill_jax import mesh as mesh_lib
from codistill_jax import metrics
from codistill_jax import optim
from codistill_jax import validate
from codistill_jax.errors import ConfigError


def test_weighted_mean_ignores_padding():
  values = jnp.array([1.0, 2.0, 100.0])
  assert float(losses.weighted_mean(values, jnp.array([1.0, 1.0, 0.0]))) == 1.5


def test_softmax_xent_matches_log_softmax_and_masks_tokens():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5))
  labels = jnp.array([[0, 1, 2], [3, 4, 0]])
  weights = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  got = losses.task_loss("softmax_xent")(logits, labels, weights)
  logp = jax.nn.log_softmax(logits)
  want = -(logp[0, 0, 0] + logp[0, 1, 1] + logp[1, 0, 3]) / 3
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_sigmoid_xent_is_log_loss():
  logits, labels = jnp.array([0.3, -2.0]), jnp.array([1.0, 0.0])
  p = jax.nn.sigmoid(logits)
  want = -(jnp.log(p[0]) + jnp.log(1 - p[1])) / 2
  np.testing.assert_allclose(
      losses.task_loss("sigmoid_xent")(logits, labels, jnp.ones(2)), want,
      rtol=1e-6)


def test_auc_matches_pairwise_definition_with_ties():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 200)
  scores = np.round(rng.random(200), 1)  # Many ties.
  pos, neg = scores[labels == 1], scores[labels == 0]
  pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
  assert metrics.auc(labels, scores) == pytest.approx(np.mean(pairs))
  assert metrics.auc(np.array([0, 0, 1, 1]), np.array([.1, .2, .3, .4])) == 1.0


def test_eval_accumulator_weights_padding_out():
  acc = metrics.EvalAccumulator("softmax_xent")
  fn = metrics.eval_metrics_fn("softmax_xent")
  logits = jnp.array([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
  batch = {"labels": jnp.array([0, 0, 1]), "weights": jnp.array([1.0, 1.0, 0])}
  acc.add(fn(logits, batch))
  assert acc.summary()["accuracy"] == 0.5


@pytest.mark.parametrize("step,every,total,want", [
    (0, 10, 100, False), (10, 10, 100, True), (11, 10, 100, False),
    (100, 30, 100, True), (99, 30, 100, False), (30, 0, 100, False)])
def test_is_time(step, every, total, want):
  assert cadence.is_time(step, every, total) == want


def test_fsdp_rule_splits_large_params_and_replicates_the_rest():
  mesh = mesh_lib.make_mesh(jax.devices())
  tree = {"params": {"big": jax.ShapeDtypeStruct((64, 24), jnp.float32),
                     "odd": jax.ShapeDtypeStruct((7, 5), jnp.float32),
                     "bias": jax.ShapeDtypeStruct((64,), jnp.float32)}}
  rules = (("params/big", "fsdp"), ("params/odd", "fsdp"))
  sh = mesh_lib.tree_shardings(mesh, tree, rules, min_size=100)
  assert sh["params"]["big"].spec == jax.sharding.PartitionSpec("data", None)
  assert sh["params"]["odd"].spec == jax.sharding.PartitionSpec()  # 7, 5 % 8.
  assert sh["params"]["bias"].spec == jax.sharding.PartitionSpec()
  x = jax.device_put(jnp.zeros((64, 24)), sh["params"]["big"])
  assert {s.data.shape for s in x.addressable_shards} == {(8, 24)}


def test_shard_batch_splits_leading_dim_over_devices():
  mesh = mesh_lib.make_mesh(jax.devices())
  batch = {"inputs": {"a": np.arange(32).reshape(16, 2)}, "labels": np.ones(16)}
  out = mesh_lib.shard_batch(batch, mesh_lib.batch_sharding(mesh))
  shards = out["inputs"]["a"].addressable_shards
  assert len(shards) == 8 and shards[1].data.shape == (2, 2)
  np.testing.assert_array_equal(np.asarray(shards[1].data), [[4, 5], [6, 7]])


def test_bad_sharding_rule_and_group_count_are_config_errors():
  with pytest.raises(ConfigError, match="sharding.rules"):
    mesh_lib.check_rules((("x", "tensor"),))
  with pytest.raises(ConfigError, match="num_groups=3"):
    mesh_lib.group_devices(3)
  assert [len(g) for g in mesh_lib.group_devices(4)] == [2, 2, 2, 2]


def test_schedules_warm_up_then_decay():
  cfg = config_lib.base_config().optimizer
  cfg.warmup_steps, cfg.learning_rate = 10, 1.0
  for name in optim.SCHEDULES:
    cfg.schedule = name
    sched = optim.make_schedule(cfg, 100)
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0)
    assert float(sched(99)) <= 1.0
  cfg.schedule = "step"
  sched = optim.make_schedule(cfg, 100)
  assert float(sched(80)) == pytest.approx(0.01)


def test_parse_arg_is_strict():
  assert config_lib.parse_arg("quick,n=3", quick=False, n=1).to_dict() == {
      "quick": True, "n": 3}
  with pytest.raises(ConfigError, match="unknown"):
    config_lib.parse_arg("quikc", quick=False)
  with pytest.raises(ConfigError, match="not a int"):
    config_lib.parse_arg("n=x", n=1)


def test_config_file_typo_is_caught():
  c = config_lib.base_config()
  c.unlock()
  c.totl_steps = 5
  with pytest.raises(ConfigError, match="totl_steps"):
    validate.validate(c)

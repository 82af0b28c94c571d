"""The public step functions, used with a model and loss defined right here.

This is the "bring your own model" example of docs/extending.md, run for real on a mesh of
8 fake devices with the batch split over 'data'.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from codistill_jax import mesh as mesh_lib
from codistill_jax import step as step_lib


class TinyRegressor(nn.Module):
  """A user's own model: not part of the package."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(1)(nn.relu(x))[:, 0]


def huber_loss(predictions, batch):
  """A user's own loss: (scalar, metrics)."""
  loss = jnp.mean(optax.huber_loss(predictions, batch["labels"]))
  return loss, {"huber": loss}


def _data(n=64, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4)).astype(np.float32)
  y = (x @ np.array([1.0, -2.0, 0.5, 0.0], np.float32)).astype(np.float32)
  return {"inputs": x, "labels": y}


def test_own_model_and_loss_train_on_a_sharded_mesh():
  model, tx = TinyRegressor(), optax.adam(1e-2)
  mesh = mesh_lib.make_mesh(jax.devices())
  batch = mesh_lib.shard_batch(_data(), mesh_lib.batch_sharding(mesh))
  state = step_lib.init_state(model, tx, jax.random.PRNGKey(0),
                              np.zeros((1, 4), np.float32))
  train_step = jax.jit(step_lib.make_train_step(model.apply, huber_loss, tx),
                       donate_argnums=(0,))
  losses = []
  for _ in range(60):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["huber"]))
  assert int(state.step) == 60
  assert losses[-1] < 0.5 * losses[0]
  assert {"loss", "grad_norm", "param_norm", "huber"} <= set(metrics)


def test_dropout_stream_depends_only_on_step():
  model, tx = TinyRegressor(), optax.sgd(0.0)  # lr 0: params never change.
  batch = _data()
  state = step_lib.init_state(model, tx, jax.random.PRNGKey(0),
                              np.zeros((1, 4), np.float32))
  train_step = jax.jit(step_lib.make_train_step(model.apply, huber_loss, tx))
  s1, m1 = train_step(state, batch)
  _, m2 = train_step(s1, batch)
  _, m1_again = train_step(state, batch)
  assert float(m1["loss"]) == float(m1_again["loss"])  # Same step, same mask.
  assert float(m1["loss"]) != float(m2["loss"])  # Next step, new mask.


def test_eval_step_is_deterministic_and_predict_gives_probabilities():
  model = TinyRegressor()
  params = model.init(jax.random.PRNGKey(1), np.zeros((1, 4), np.float32),
                      train=False)
  batch = _data()
  eval_step = jax.jit(step_lib.make_eval_step(
      model.apply, lambda p, b: {"sse": jnp.sum((p - b["labels"]) ** 2)}))
  assert float(eval_step(params, batch)["sse"]) == float(
      eval_step(params, batch)["sse"])
  probs = step_lib.make_predict(model.apply, binary=True)(params,
                                                          batch["inputs"])
  assert probs.shape == (64,) and bool(jnp.all((probs > 0) & (probs < 1)))


def test_golden_train_step_with_distillation():
  """One step, fixed params, teachers and batch: loss and updates pinned.

  The loss is also recomputed in float64 numpy from its definition (task
  cross-entropy + alpha * KL to the mean teacher probabilities, padding
  masked); the updated values are golden: a change in the step's arithmetic
  (the divergence, its scaling, the reduction, the optimizer wiring) moves
  them.
  """
  from codistill_jax import distill  # pylint: disable=g-import-not-at-top
  from codistill_jax import losses  # pylint: disable=g-import-not-at-top

  def apply_fn(p, x, train=False, rngs=None):
    del train, rngs
    return x @ p["params"]["w"] + p["params"]["b"][None]

  w0 = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
  params = {"params": {"w": w0, "b": np.array([0.1, -0.2, 0.3], np.float32)}}
  tw = np.stack([np.full((4, 3), 0.5, np.float32) * np.arange(3),
                 np.eye(4, 3, dtype=np.float32)]).astype(np.float32)
  teachers = step_lib.Teachers(
      {"params": {"w": tw, "b": np.zeros((2, 3), np.float32)}},
      np.ones(2, np.float32))
  batch = {"inputs": np.arange(20, dtype=np.float32).reshape(5, 4) / 10 - 1,
           "labels": np.array([0, 1, 2, 1, 0], np.int32),
           "weights": np.array([1, 1, 1, 1, 0], np.float32)}  # One padding.
  tx = optax.sgd(0.1)
  state = step_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=tx.init(params), rng=jnp.zeros(2, jnp.uint32))
  term = distill.Dense(apply_fn, losses.alpha_schedule(0.5, 0))
  train_step = jax.jit(step_lib.make_train_step(
      apply_fn, step_lib.make_loss_fn(losses.task_loss("softmax_xent")), tx,
      distill=term))
  new, m = train_step(state, batch, teachers)

  def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  x, w = batch["inputs"].astype(np.float64), batch["weights"]
  p = softmax(x @ w0 + params["params"]["b"])
  task = -(np.log(p[np.arange(5), batch["labels"]]) * w).sum() / w.sum()
  pt = np.mean([softmax(x @ tw[i]) for i in range(2)], 0)
  kl = ((pt * (np.log(pt) - np.log(p))).sum(-1) * w).sum() / w.sum()
  np.testing.assert_allclose(float(m["task_loss"]), task, rtol=1e-6)
  np.testing.assert_allclose(float(m["distill_loss"]), kl, rtol=1e-5)
  np.testing.assert_allclose(float(m["loss"]), task + 0.5 * kl, rtol=1e-6)
  # Golden values (float32, this step's arithmetic).
  np.testing.assert_allclose(float(m["loss"]), 1.0832073688, rtol=1e-6)
  np.testing.assert_allclose(float(m["grad_norm"]), 0.3866543472, rtol=1e-5)
  np.testing.assert_allclose(new.params["params"]["w"][0],
                             [-1.0033084, -0.8193132, -0.6319238], rtol=1e-6)
  np.testing.assert_allclose(new.params["params"]["b"],
                             [0.08357784, -0.17143714, 0.28785932], rtol=1e-6)
  assert int(new.step) == 1 and float(m["alpha"]) == 0.5


def test_microbatches_accumulate_to_the_whole_batch():
  """k pieces through lax.scan equal one batch (weighted by their padding)."""
  from codistill_jax import distill  # pylint: disable=g-import-not-at-top
  from codistill_jax import losses  # pylint: disable=g-import-not-at-top
  class Dense(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      del train
      return nn.Dense(3)(x)

  model = Dense()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 4)).astype(np.float32)
  weights = np.ones(16, np.float32)
  weights[[1, 2, 3, 7, 13]] = 0  # Padding, unevenly spread over the pieces.
  batch = {"inputs": x, "labels": rng.integers(0, 3, 16).astype(np.int32),
           "weights": weights}
  tx = optax.adam(1e-2)
  state = step_lib.init_state(model, tx, jax.random.PRNGKey(0), x[:1])
  tparams = [model.init(jax.random.PRNGKey(5 + i), x[:1]) for i in range(2)]
  teachers = step_lib.Teachers(jax.tree.map(lambda *a: jnp.stack(a),
                                            *tparams), jnp.ones(2))
  apply_fn = lambda p, x, train=False, rngs=None: model.apply(p, x)
  loss_fn = step_lib.make_loss_fn(losses.task_loss("softmax_xent"))
  term = distill.Dense(apply_fn, losses.alpha_schedule(0.5, 0))
  out = {}
  for k in (1, 4):
    step = jax.jit(step_lib.make_train_step(apply_fn, loss_fn, tx,
                                            distill=term, microbatches=k))
    out[k] = step(state, batch, teachers)
  (s1, m1), (s4, m4) = out[1], out[4]
  for key in ("loss", "task_loss", "distill_loss", "grad_norm"):
    np.testing.assert_allclose(m4[key], m1[key], rtol=2e-5)
  for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Unweighted averaging of the pieces would not be equal: the test can fail.
  assert not np.isclose(float(m1["task_loss"]), float(np.mean([
      losses.task_loss("softmax_xent")(model.apply(state.params, x[i::4]),
                                       batch["labels"][i::4], weights[i::4])
      for i in range(4)])), rtol=1e-4)

"""The public step functions, used with a model and loss defined right here.

This is the README's "bring your own model" example, run for real on a mesh of
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

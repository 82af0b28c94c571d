"""Periodic parameter averaging (local SGD / DiLoCo): the pure pieces.

The low-communication alternative to codistillation on the same groups and the
same exchange (Douillard et al. 2023, "DiLoCo"): each group runs its inner
optimizer on its own data; every H steps (`codistill.exchange_every`) it
publishes its params, reads its peers' params of that step, and applies an
outer optimizer to the mean delta

    outer_grad = anchor - mean_g(params_g)
    anchor    <- outer_tx(anchor, outer_grad)       (Nesterov SGD by default)
    params_g  <- anchor                              for every group g

where `anchor` is the params every group held after the previous average.
With outer SGD at learning rate 1 and no momentum this is plain averaging;
with H = 1 and an inner SGD as well it is synchronous data-parallel SGD over
the union of the groups' batches (tests/test_averaging.py).

The anchor and the outer optimizer's state live in the train state's
`opt_state` (`with_outer`), so own checkpoints hold them, a resumed run
continues exactly, and they are sharded by the same rules as the params. The
train step is unchanged: the inner optimizer sees only its own state.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from codistill_jax import step as step_lib

OUTER_OPTIMIZERS = ("nesterov", "sgd")


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the config's groups average params (else they distil).

  `codistill.method='average'` is only valid with peers as the teachers
  (teachers.check_config refuses anything else).
  """
  cd = config.codistill
  return cd.method == "average" and cd.num_groups > 1


class OuterState(NamedTuple):
  """`opt_state` of `with_outer(inner, outer)`."""
  inner: Any  # The inner optimizer's state (what the train step updates).
  anchor: Any  # Params after the last average (every group's the same).
  outer: Any  # The outer optimizer's state.


def with_outer(inner: optax.GradientTransformation,
               outer: optax.GradientTransformation
               ) -> optax.GradientTransformation:
  """`inner`, carrying an anchor copy of the params and `outer`'s state.

  `update` is `inner.update` and leaves the anchor and the outer state as
  they are; `outer_step` changes them.
  """

  def init(params):
    return OuterState(inner.init(params), params, outer.init(params))

  def update(grads, state, params=None):
    updates, inner_state = inner.update(grads, state.inner, params)
    return updates, state._replace(inner=inner_state)

  return optax.GradientTransformation(init, update)


def make_outer_tx(cd: ml_collections.ConfigDict
                  ) -> optax.GradientTransformation:
  """The outer optimizer of `config.codistill.averaging`."""
  a = cd.averaging
  if a.outer_optimizer == "nesterov":
    return optax.sgd(a.outer_learning_rate, momentum=a.outer_momentum,
                     nesterov=True)
  return optax.sgd(a.outer_learning_rate)


def make_outer_step(outer: optax.GradientTransformation):
  """Returns `outer_step(state, peers) -> state` (pure; jit it).

  Args (of the returned function):
    state: a `TrainState` whose `opt_state` is an `OuterState`.
    peers: the peers' params as `step_lib.Teachers` (stacked on a leading
      axis); a slot of weight 0 (nothing read from that peer) is left out of
      the mean.
  """

  def outer_step(state: step_lib.TrainState, peers: step_lib.Teachers):
    o = state.opt_state
    w = peers.weights.astype(jnp.float32)
    n = 1.0 + jnp.sum(w)

    def mean(own, stacked):
      total = own.astype(jnp.float32) + jnp.tensordot(
          w, stacked.astype(jnp.float32), axes=1)
      return (total / n).astype(own.dtype)

    averaged = jax.tree.map(mean, state.params, peers.params)
    outer_grad = jax.tree.map(jnp.subtract, o.anchor, averaged)
    updates, outer_state = outer.update(outer_grad, o.outer, o.anchor)
    anchor = optax.apply_updates(o.anchor, updates)
    return state.replace(params=anchor, opt_state=o._replace(
        anchor=anchor, outer=outer_state))

  return outer_step


def drift(state: step_lib.TrainState, peers: step_lib.Teachers) -> jax.Array:
  """RMS distance of the peers' params from this group's, before averaging."""
  w = peers.weights.astype(jnp.float32)

  def sq(own, stacked):
    d = stacked.astype(jnp.float32) - own.astype(jnp.float32)[None]
    return jnp.tensordot(w, jnp.sum(d.reshape(d.shape[0], -1)**2, 1), 1)

  size = sum(x.size for x in jax.tree.leaves(state.params))
  total = sum(jax.tree.leaves(jax.tree.map(sq, state.params, peers.params)))
  return jnp.sqrt(total / (size * jnp.maximum(jnp.sum(w), 1.0)))

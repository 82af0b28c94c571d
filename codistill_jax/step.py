"""Pure, jittable step functions: init, train step, eval step, predict.

Nothing here knows about files, meshes, data pipelines or configs: the trainer
binds the model's apply function, the loss and the optimizer by closure and
jits the result with explicit shardings. Users can do the same with their own
Flax module and loss (README, `tests/test_step.py`).

State is a plain pytree (`TrainState`). The dropout rng of step s is
`fold_in(state.rng, s)`, so the random stream depends only on the step and a
resumed run continues exactly.
"""

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from codistill_jax import losses

Batch = dict[str, Any]
# loss_fn(logits, batch) -> (scalar loss, dict of scalar metrics to log).
LossFn = Callable[[jax.Array, Batch], tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates applied so far.
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] raw key, so checkpoints hold it as plain data.


def init_state(model, tx: optax.GradientTransformation, rng: jax.Array,
               example_inputs: Any) -> TrainState:
  """Initialises params and optimizer state; wrap in jit(out_shardings=...)."""
  init_rng, state_rng = jax.random.split(rng)
  params = model.init(init_rng, example_inputs, train=False)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), rng=state_rng)


def make_loss_fn(task_loss: Callable[[jax.Array, jax.Array, jax.Array],
                                     jax.Array]) -> LossFn:
  """Adapts `task_loss(logits, labels, weights)` to the LossFn signature."""

  def loss_fn(logits, batch):
    loss = task_loss(logits, batch["labels"], batch["weights"])
    return loss, {"task_loss": loss}

  return loss_fn


@flax.struct.dataclass
class Teachers:
  """Stale peer (or fixed teacher) parameters, stacked on a leading axis."""
  params: Any  # Every leaf [n_teachers, ...].
  weights: jax.Array  # [n_teachers]; 0 = this slot holds no teacher yet.


@dataclasses.dataclass(frozen=True)
class Distill:
  """How the distillation term is computed (static: bound by closure)."""
  teacher_apply_fn: Callable[..., jax.Array]  # May be another architecture.
  alpha_fn: Callable[[jax.Array], jax.Array]  # step -> weight of the term.
  divergence: str = "kl"  # One of losses.DIVERGENCES.
  temperature: float = 1.0
  binary: bool = False  # One sigmoid logit per example (CTR).
  teacher_map: str = "unroll"  # 'unroll' (a forward per teacher) | 'vmap'.


def _teacher_logits(distill: "Distill", stacked_params, inputs) -> jax.Array:
  """[n_teachers, ...] logits of the stacked teachers, deterministic."""
  apply = lambda p: distill.teacher_apply_fn(p, inputs, train=False)
  if distill.teacher_map == "vmap":
    return jax.vmap(apply)(stacked_params)
  # 'unroll': one ordinary forward per teacher slice. vmapping a conv over
  # its weights makes a grouped convolution, much slower on CPU/GPU than n
  # plain ones; n is small and static.
  n = jax.tree.leaves(stacked_params)[0].shape[0]
  return jnp.stack([apply(jax.tree.map(lambda x, i=i: x[i], stacked_params))
                    for i in range(n)])


def make_train_step(apply_fn: Callable[..., jax.Array], loss_fn: LossFn,
                    tx: optax.GradientTransformation,
                    lr_fn: Callable[[jax.Array], jax.Array] | None = None,
                    distill: Distill | None = None):
  """Returns `train_step(state, batch, teachers=None) -> (state, metrics)`.

  Args:
    apply_fn: `apply_fn(params, inputs, train=..., rngs=...) -> logits`, e.g. a
      Flax module's `apply`.
    loss_fn: `loss_fn(logits, batch) -> (loss, metrics)`.
    tx: the optax optimizer.
    lr_fn: optional schedule, only used to log the learning rate.
    distill: if given, `teachers` (a `Teachers`) is required and the loss gets
      `alpha(step) * D(mean teacher probabilities || student)`. The teachers
      run deterministically (train=False) with stopped gradients, vmapped over
      their stacked parameters inside this one program.
  """

  def train_step(state: TrainState, batch: Batch,
                 teachers: Teachers | None = None):
    rng = jax.random.fold_in(state.rng, state.step)
    if distill is not None:
      teacher_logits = _teacher_logits(distill, teachers.params,
                                       batch["inputs"])
      t_probs, t_logits, has_teacher, t_entropy = losses.teacher_targets(
          teacher_logits, teachers.weights, distill.temperature,
          distill.binary)
      alpha = distill.alpha_fn(state.step) * has_teacher

    def objective(params):
      logits = apply_fn(params, batch["inputs"], train=True,
                        rngs={"dropout": rng})
      loss, aux = loss_fn(logits, batch)
      if distill is None:
        return loss, aux
      per_example = losses.distill_divergence(
          logits, t_probs, t_logits, divergence=distill.divergence,
          temperature=distill.temperature, binary=distill.binary,
          teacher_entropy=t_entropy)
      # 0 until a teacher exists, so the log never shows a loss vs nothing.
      d = jnp.where(has_teacher,
                    losses.weighted_mean(per_example, batch["weights"]), 0.0)
      aux = {**aux, "distill_loss": d, "alpha": alpha,
             **losses.agreement(logits, t_probs, batch["weights"],
                                distill.binary)}
      return loss + alpha * d, aux

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(params), **aux}
    if lr_fn is not None:
      metrics["learning_rate"] = lr_fn(state.step)
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(apply_fn: Callable[..., jax.Array],
                   metrics_fn: Callable[[jax.Array, Batch], dict[str, Any]]):
  """Returns `eval_step(params, batch) -> metrics_fn(logits, batch)`."""

  def eval_step(params, batch: Batch):
    logits = apply_fn(params, batch["inputs"], train=False)
    return metrics_fn(logits, batch)

  return eval_step


def make_predict(apply_fn: Callable[..., jax.Array], binary: bool):
  """Returns `predict(params, inputs) -> probabilities` (deterministic)."""

  def predict(params, inputs):
    logits = apply_fn(params, inputs, train=False).astype(jnp.float32)
    return jax.nn.sigmoid(logits) if binary else jax.nn.softmax(logits, -1)

  return predict

"""Pure, jittable step functions: init, train step, eval step, predict.

Nothing here knows about files, meshes, data pipelines or configs: the trainer
binds the model's apply function, the loss and the optimizer by closure and
jits the result with explicit shardings. Users can do the same with their own
Flax module and loss (docs/extending.md, `tests/test_step.py`).

State is a plain pytree (`TrainState`). The dropout rng of step s is
`fold_in(state.rng, s)`, so the random stream depends only on the step and a
resumed run continues exactly.
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from codistill_jax import distill as distill_lib

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


def make_train_step(apply_fn: Callable[..., jax.Array], loss_fn: LossFn,
                    tx: optax.GradientTransformation,
                    lr_fn: Callable[[jax.Array], jax.Array] | None = None,
                    distill: Any = None, microbatches: int = 1,
                    task_from: int = 0):
  """Returns `train_step(state, batch, teachers=None) -> (state, metrics)`.

  Args:
    apply_fn: `apply_fn(params, inputs, train=..., rngs=...) -> logits`, e.g. a
      Flax module's `apply`.
    loss_fn: `loss_fn(logits, batch) -> (loss, metrics)`.
    tx: the optax optimizer.
    lr_fn: optional schedule, only used to log the learning rate.
    distill: a distillation term (`distill.Dense`, `TopK`, `Precomputed`,
      `Sampled`, or your own with the same two methods): the loss becomes
      `task + alpha(step) * term`, with `teachers` (a `Teachers`) as the
      step's third argument unless the targets arrive in the batch. The
      teachers run inside this one program, deterministically and with
      stopped gradients.
    microbatches: gradient accumulation: the batch is cut into this many
      pieces (example i of the batch in piece i mod k, so every device holds
      rows of every piece) run one after another in a `lax.scan`, the
      teachers' forward too; gradients, losses and metrics are combined
      weighted by each piece's total `weights`, which equals the whole batch
      at once (no dropout) up to float rounding.
    task_from: with a distillation term, the task loss counts from this step
      on (or while no teacher is held); before, the update is the term's
      alone: a joining group's distillation-only warm-up.
  """
  student = distill_lib.Student(apply_fn, loss_fn)

  def grads_of(params, batch, teachers, rng, step):
    """(loss, metrics, grads) of one (micro)batch."""
    if distill is not None:
      target, has_teacher = distill.target(teachers, batch)
      alpha = distill.alpha_fn(step) * has_teacher

    def objective(params):
      if distill is None:
        logits = apply_fn(params, batch["inputs"], train=True,
                          rngs={"dropout": rng})
        return loss_fn(logits, batch)
      task, d, aux = distill.loss(student, params, batch, rng, target)
      # 0 until a teacher exists, so the log never shows a loss vs nothing.
      d = jnp.where(has_teacher, d, 0.0)
      logged = {**aux, "distill_loss": d, "alpha": alpha,
                "teacher_held": has_teacher.astype(jnp.float32)}
      if task_from:
        task_weight = ((step >= task_from) | ~has_teacher).astype(task.dtype)
        return task_weight * task + alpha * d, logged
      return task + alpha * d, logged

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return loss, aux, grads

  def accumulated(params, batch, teachers, rng, step):
    """grads_of over `microbatches` pieces, weighted by their weights."""
    k = microbatches
    pieces = jax.tree.map(lambda x: jnp.moveaxis(
        x.reshape((x.shape[0] // k, k) + x.shape[1:]), 1, 0), batch)

    def body(total, i_piece):
      i, piece = i_piece
      out = grads_of(params, piece, teachers, jax.random.fold_in(rng, i),
                     step)
      w = jnp.sum(piece["weights"])
      return jax.tree.map(lambda t, x: t + w * x.astype(t.dtype), total,
                          out), w

    shapes = jax.eval_shape(grads_of, params, jax.tree.map(
        lambda x: x[0], pieces), teachers, rng, step)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(
        s.dtype, jnp.float32)), shapes)
    total, ws = jax.lax.scan(body, zeros, (jnp.arange(k), pieces))
    norm = jnp.maximum(jnp.sum(ws), 1e-12)
    return jax.tree.map(lambda t: t / norm, total)

  def train_step(state: TrainState, batch: Batch,
                 teachers: Teachers | None = None):
    rng = jax.random.fold_in(state.rng, state.step)
    compute = grads_of if microbatches == 1 else accumulated
    loss, aux, grads = compute(state.params, batch, teachers, rng, state.step)
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

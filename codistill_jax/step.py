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
from codistill_jax import sampling

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
  """How the distillation term is computed (static: bound by closure).

  Teacher targets come from one of three places:
    * in-process teachers: `teacher_apply_fn` set and `Teachers` passed to the
      step; their mean probabilities are the target (cut to a sparse top-k
      target when `topk` > 0);
    * precomputed: `teacher_apply_fn=None`; the batch carries
      `batch["teacher"]`, either `{"probs": [..., C]}` (at temperature T; for
      one sigmoid logit [...] = P(y = 1)) or `{"topk_ids": [..., k],
      "topk_probs": [..., k]}` (the rest of the mass is the tail bucket);
    * `sampled`: in-process teachers, the loss estimated on sampled classes of
      the output layers (`sampling.py`).
  """
  teacher_apply_fn: Callable[..., jax.Array] | None  # Any architecture.
  alpha_fn: Callable[[jax.Array], jax.Array]  # step -> weight of the term.
  divergence: str = "kl"  # One of losses.DIVERGENCES.
  temperature: float = 1.0
  binary: bool = False  # One sigmoid logit per example (CTR).
  teacher_map: str = "unroll"  # 'unroll' (a forward per teacher) | 'vmap'.
  topk: int = 0  # > 0: in-process targets cut to their top-k + tail.
  topk_mode: str = "tail"  # One of sampling.TOPK_MODES.
  sampled: sampling.SampledHead | None = None


def _per_teacher(distill: "Distill", fn, stacked_params) -> jax.Array:
  """[n_teachers, ...] = fn(params) of each stacked teacher slice."""
  if distill.teacher_map == "vmap":
    return jax.vmap(fn)(stacked_params)
  # 'unroll': one ordinary forward per teacher slice. vmapping a conv over
  # its weights makes a grouped convolution, much slower on CPU/GPU than n
  # plain ones; n is small and static.
  n = jax.tree.leaves(stacked_params)[0].shape[0]
  return jnp.stack([fn(jax.tree.map(lambda x, i=i: x[i], stacked_params))
                    for i in range(n)])


def _teacher_target(distill: "Distill", teachers, batch):
  """(target dict, has_teacher): the dense or sparse target of this batch."""
  if distill.teacher_apply_fn is None:
    target = batch["teacher"]
    return jax.tree.map(jax.lax.stop_gradient, target), jnp.array(True)
  teacher_logits = _per_teacher(
      distill, lambda p: distill.teacher_apply_fn(p, batch["inputs"],
                                                  train=False),
      teachers.params)
  probs, logits, has_teacher, entropy = losses.teacher_targets(
      teacher_logits, teachers.weights, distill.temperature, distill.binary)
  if distill.topk:
    return sampling.topk_target(probs, distill.topk), has_teacher
  return {"probs": probs, "logits": logits, "entropy": entropy}, has_teacher


def _divergence(distill: "Distill", logits, target, weights):
  """(per-example divergence, agreement metrics) against a target dict."""
  if "topk_ids" in target:
    per_example = sampling.topk_divergence(
        logits, target["topk_ids"], target["topk_probs"],
        mode=distill.topk_mode, divergence=distill.divergence,
        temperature=distill.temperature)
    z = jax.lax.stop_gradient(logits)
    top = jnp.take_along_axis(z, target["topk_ids"][..., :1], -1)[..., 0]
    same = (top >= jnp.max(z, -1)).astype(jnp.float32)
    return per_example, {"peer_agreement": losses.weighted_mean(same, weights)}
  per_example = losses.distill_divergence(
      logits, target["probs"], target.get("logits"),
      divergence=distill.divergence, temperature=distill.temperature,
      binary=distill.binary, teacher_entropy=target.get("entropy"))
  return per_example, losses.agreement(logits, target["probs"], weights,
                                       distill.binary)


def _sampled_teacher(distill: "Distill", teachers, inputs):
  """Teachers' final hidden states [n, N, d] and output embeddings."""
  sh = distill.sampled
  hidden = _per_teacher(
      distill, lambda p: sh.teacher_hidden_fn(p, inputs), teachers.params)
  hidden = jax.lax.stop_gradient(hidden.astype(jnp.float32))
  kernel, bias = jax.tree.map(
      lambda x: jax.lax.stop_gradient(x.astype(jnp.float32)),
      sh.teacher_output_embedding(teachers.params))  # [n, d, V], [n, V].
  return hidden.reshape(hidden.shape[0], -1, hidden.shape[-1]), kernel, bias


def _sampled_objective(distill: "Distill", params, batch, rng, teacher,
                       teacher_weights, has_teacher, loss_fn):
  """(task loss, distill loss, metrics) with the output layers sampled."""
  sh, temp = distill.sampled, distill.temperature
  hidden = sh.hidden_fn(params, batch["inputs"], train=True,
                        rngs={"dropout": rng})
  kernel, bias = sh.output_embedding(params)
  h = hidden.reshape(-1, hidden.shape[-1]).astype(jnp.float32)
  labels = batch["labels"].reshape(-1)
  weights = batch["weights"].reshape(-1)
  t_hidden, t_kernel, t_bias = teacher
  rng_pos, rng_sample = jax.random.split(jax.random.fold_in(rng, 1))

  # The proposal: full distributions at a few positions only, no gradient.
  p = weights / jnp.maximum(jnp.sum(weights), 1e-12)
  pos = jax.random.choice(rng_pos, h.shape[0], (sh.proposal_positions,),
                          p=jnp.where(jnp.sum(weights) > 0, p,
                                      1.0 / h.shape[0]))
  w = teacher_weights / jnp.maximum(jnp.sum(teacher_weights), 1e-12)
  student_probs = jax.nn.softmax(
      (jax.lax.stop_gradient(h[pos]) @ kernel + bias[None]) / temp, -1)
  teacher_probs = jnp.einsum("t,tmv->mv", w, jax.nn.softmax(
      (jnp.einsum("tmd,tdv->tmv", t_hidden[:, pos], t_kernel) +
       t_bias[:, None]) / temp, -1))
  q = sampling.proposal(
      sh.proposal, num_samples=sh.num_samples, vocab_size=kernel.shape[-1],
      teacher_probs=teacher_probs, student_probs=student_probs,
      prior_mix=sh.prior_mix, uniform_mix=sh.uniform_mix, unigram=sh.unigram)
  sample = sampling.systematic_sample(rng_sample, q, sh.num_samples)

  # The estimators on [N, K + 1] logits.
  log_w = sampling.column_log_weights(sample, labels)
  z = sampling.sampled_logits(h, kernel, bias, sample.ids, labels)
  t_z = jax.vmap(sampling.sampled_logits, (0, 0, 0, None, None))(
      t_hidden, t_kernel, t_bias, sample.ids, labels) / temp
  # An empty slot gets weight 0; all-empty keeps the forward finite (masked).
  t_weights = jnp.where(jnp.sum(teacher_weights) > 0, teacher_weights, 1.0)
  t_log_probs = sampling.sampled_teacher_log_probs(t_z, log_w, t_weights)
  per_position = sampling.sampled_divergence(
      z, t_log_probs, log_w, distill.divergence, temp)
  d = jnp.where(has_teacher, losses.weighted_mean(per_position, weights), 0.0)
  if sh.task_loss:
    task = losses.weighted_mean(sampling.sampled_task_loss(z, log_w), weights)
    aux = {"task_loss": task}
  else:
    logits = (h @ kernel + bias[None]).reshape(hidden.shape[:-1] + (-1,))
    task, aux = loss_fn(logits, batch)
  return task, d, {**aux, "sampled_classes": jnp.sum(sample.valid)}


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
    distill: if given, the loss gets `alpha(step) * D(teacher || student)`;
      `teachers` (a `Teachers`) is required unless the targets are
      precomputed in the batch (`Distill`). The teachers run
      deterministically (train=False) with stopped gradients inside this one
      program.
  """

  def train_step(state: TrainState, batch: Batch,
                 teachers: Teachers | None = None):
    rng = jax.random.fold_in(state.rng, state.step)
    if distill is not None:
      if distill.sampled is not None:
        teacher = _sampled_teacher(distill, teachers, batch["inputs"])
        has_teacher = jnp.sum(teachers.weights) > 0
      else:
        target, has_teacher = _teacher_target(distill, teachers, batch)
      alpha = distill.alpha_fn(state.step) * has_teacher

    def objective(params):
      if distill is not None and distill.sampled is not None:
        loss, d, aux = _sampled_objective(distill, params, batch, rng, teacher,
                                          teachers.weights, has_teacher,
                                          loss_fn)
        return loss + alpha * d, {**aux, "distill_loss": d, "alpha": alpha}
      logits = apply_fn(params, batch["inputs"], train=True,
                        rngs={"dropout": rng})
      loss, aux = loss_fn(logits, batch)
      if distill is None:
        return loss, aux
      per_example, agree = _divergence(distill, logits, target,
                                       batch["weights"])
      # 0 until a teacher exists, so the log never shows a loss vs nothing.
      d = jnp.where(has_teacher,
                    losses.weighted_mean(per_example, batch["weights"]), 0.0)
      aux = {**aux, "distill_loss": d, "alpha": alpha, **agree}
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

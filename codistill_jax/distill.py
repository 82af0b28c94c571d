"""Distillation terms: one signature, four implementations (pure functions).

The train step's loss is `task + alpha(step) * term` (`step.make_train_step`).
A term is a small frozen dataclass with two methods, both traced inside the
one jitted step:

  target(teachers, batch) -> (target, has_teacher)
      What the student is pulled towards, computed outside the gradient (the
      teachers run deterministically, train=False, and every output is
      stopped); `has_teacher` is False while no teacher is held yet, which
      zeroes the term.
  loss(student, params, batch, rng, target) -> (task, distill, metrics)
      The student's forward (with its own dropout rng; its logits are *not*
      stopped), its task loss and the batch-mean divergence to the target.

  Dense        in-process teachers (peers' stale params or a fixed teacher of
               any architecture): the mean of their probabilities.
  TopK         the same target cut to its k largest probabilities plus one
               tail bucket with the rest of the mass.
  Precomputed  targets that arrive in `batch['teacher']` (the teacher
               service, the target store): dense `{'probs'}` or sparse
               `{'topk_ids', 'topk_probs'}`.
  Sampled      importance-sampled output layers for large vocabularies
               (`sampling.py`; Li et al. 2018): neither student nor teachers
               form the full [positions, V] logits.

A new term is one more class with these two methods; nothing else changes.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from codistill_jax import losses
from codistill_jax import sampling


class Student(NamedTuple):
  """The student's forward and task loss, as the step binds them."""
  apply_fn: Callable[..., jax.Array]  # (params, inputs, train, rngs) -> logits.
  loss_fn: Callable[..., Any]  # (logits, batch) -> (loss, metrics).


def per_teacher(fn: Callable[[Any], jax.Array], stacked_params) -> jax.Array:
  """[n_teachers, ...] = fn(params) of each slice of the stacked params.

  One ordinary forward per teacher: vmapping a conv over its weights makes a
  grouped convolution, much slower on CPU/GPU than n plain ones; n is small
  and static.
  """
  n = jax.tree.leaves(stacked_params)[0].shape[0]
  return jnp.stack([fn(jax.tree.map(lambda x, i=i: x[i], stacked_params))
                    for i in range(n)])


def _student_forward(student: Student, params, batch, rng):
  logits = student.apply_fn(params, batch["inputs"], train=True,
                            rngs={"dropout": rng})
  task, aux = student.loss_fn(logits, batch)
  return logits, task, aux


def _dense_divergence(term, logits, target, weights):
  """(batch-mean divergence, agreement metrics) to a dense target."""
  per_example = losses.distill_divergence(
      logits, target["probs"], target.get("logits"),
      divergence=term.divergence, temperature=term.temperature,
      binary=term.binary, teacher_entropy=target.get("entropy"))
  return (losses.weighted_mean(per_example, weights),
          losses.agreement(logits, target["probs"], weights, term.binary))


def _topk_divergence(term, logits, target, weights):
  """(batch-mean divergence, agreement metrics) to a top-k + tail target."""
  per_example = sampling.topk_divergence(
      logits, target["topk_ids"], target["topk_probs"], mode=term.topk_mode,
      divergence=term.divergence, temperature=term.temperature)
  z = jax.lax.stop_gradient(logits)
  top = jnp.take_along_axis(z, target["topk_ids"][..., :1], -1)[..., 0]
  same = (top >= jnp.max(z, -1)).astype(jnp.float32)
  return (losses.weighted_mean(per_example, weights),
          {"peer_agreement": losses.weighted_mean(same, weights)})


@dataclasses.dataclass(frozen=True)
class Dense:
  """Towards the mean probabilities of in-process teachers (any architecture).

  With stacked `Teachers` (step.Teachers) as the step's third argument; a
  slot of weight 0 (nothing published yet) does not count, and the target is
  the weights' mean. Teachers of several architectures: `teacher_apply_fn`
  is a tuple of apply functions and the argument a tuple of `Teachers`, one
  per architecture.
  """
  teacher_apply_fn: Callable[..., jax.Array] | tuple[Callable, ...]
  alpha_fn: Callable[[jax.Array], jax.Array]  # step -> weight of the term.
  divergence: str = "kl"  # One of losses.DIVERGENCES.
  temperature: float = 1.0
  binary: bool = False  # One sigmoid logit per example (CTR).

  def _mean_target(self, teachers, batch):
    if isinstance(self.teacher_apply_fn, tuple):
      # Teachers of several architectures: one stacked `Teachers` per
      # architecture (a tuple, in the order of the apply functions), each
      # run by its own forward; their predictions are pooled.
      teacher_logits = jnp.concatenate([per_teacher(
          lambda p, f=f: f(p, batch["inputs"], train=False).astype(
              jnp.float32), t.params)
                                        for f, t in zip(self.teacher_apply_fn,
                                                        teachers)])
      weights = jnp.concatenate([t.weights for t in teachers])
    else:
      teacher_logits = per_teacher(
          lambda p: self.teacher_apply_fn(p, batch["inputs"], train=False),
          teachers.params)
      weights = teachers.weights
    probs, logits, has_teacher, entropy = losses.teacher_targets(
        teacher_logits, weights, self.temperature, self.binary)
    return {"probs": probs, "logits": logits, "entropy": entropy}, has_teacher

  def target(self, teachers, batch):
    return self._mean_target(teachers, batch)

  def loss(self, student: Student, params, batch, rng, target):
    logits, task, aux = _student_forward(student, params, batch, rng)
    d, agree = _dense_divergence(self, logits, target, batch["weights"])
    return task, d, {**aux, **agree}


@dataclasses.dataclass(frozen=True)
class TopK(Dense):
  """Dense's target cut to its top `k` probabilities plus a tail bucket."""
  k: int = 1
  topk_mode: str = "tail"  # One of sampling.TOPK_MODES.

  def target(self, teachers, batch):
    dense, has_teacher = self._mean_target(teachers, batch)
    return sampling.topk_target(dense["probs"], self.k), has_teacher

  def loss(self, student: Student, params, batch, rng, target):
    logits, task, aux = _student_forward(student, params, batch, rng)
    d, agree = _topk_divergence(self, logits, target, batch["weights"])
    return task, d, {**aux, **agree}


def target_fn(apply_fn: Callable[..., jax.Array], temperature: float,
              binary: bool, topk: int = 0):
  """`fn(params, inputs) -> target` of one teacher, as `Precomputed` reads it.

  What the teacher service and the target store send: `{'probs'}` or, with
  `topk` > 0, `{'topk_ids', 'topk_probs'}`. The probabilities are computed
  with the same ops as `losses.teacher_targets` on one teacher (float32
  logits / T, then sigmoid or exp(log_softmax)), so precomputed and
  in-process targets agree to float rounding.
  """

  def fn(params, inputs):
    logits = apply_fn(params, inputs, train=False).astype(jnp.float32)
    scaled = logits / temperature
    if binary:
      probs = jax.nn.sigmoid(scaled)
    else:
      probs = jnp.exp(jax.nn.log_softmax(scaled, -1))
    if topk:
      return sampling.topk_target(probs, topk)
    return {"probs": probs}

  return fn


@dataclasses.dataclass(frozen=True)
class Precomputed:
  """Towards the targets in `batch['teacher']`, computed elsewhere.

  Either `{'probs': [..., C]}` at temperature T (for one sigmoid logit,
  [...] = P(y = 1)) or `{'topk_ids': [..., k], 'topk_probs': [..., k]}`
  (the rest of the mass is the tail bucket). The step takes no teachers.
  """
  alpha_fn: Callable[[jax.Array], jax.Array]
  divergence: str = "kl"
  temperature: float = 1.0
  binary: bool = False
  topk_mode: str = "tail"

  def target(self, teachers, batch):
    del teachers
    return (jax.tree.map(jax.lax.stop_gradient, batch["teacher"]),
            jnp.array(True))

  def loss(self, student: Student, params, batch, rng, target):
    logits, task, aux = _student_forward(student, params, batch, rng)
    divergence = (_topk_divergence if "topk_ids" in target else
                  _dense_divergence)
    d, agree = divergence(self, logits, target, batch["weights"])
    return task, d, {**aux, **agree}


@dataclasses.dataclass(frozen=True)
class Sampled:
  """Importance-sampled output layers of student and teachers (sampling.py).

  The target is the teachers' final hidden states and output embeddings; the
  loss draws K classes shared by the batch, evaluates both output layers on
  them (plus each position's label) and estimates the divergence (and, with
  `head.task_loss`, the task loss) from them.
  """
  head: sampling.SampledHead
  alpha_fn: Callable[[jax.Array], jax.Array]
  divergence: str = "kl"  # 'kl' or 'xent'.
  temperature: float = 1.0

  def target(self, teachers, batch):
    sh = self.head
    hidden = per_teacher(lambda p: sh.teacher_hidden_fn(p, batch["inputs"]),
                         teachers.params)
    hidden = jax.lax.stop_gradient(hidden.astype(jnp.float32))
    kernel, bias = jax.tree.map(
        lambda x: jax.lax.stop_gradient(x.astype(jnp.float32)),
        sh.teacher_output_embedding(teachers.params))  # [n, d, V], [n, V].
    hidden = hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])
    target = {"hidden": hidden, "kernel": kernel, "bias": bias,
              "weights": teachers.weights}
    return target, jnp.sum(teachers.weights) > 0

  def loss(self, student: Student, params, batch, rng, target):
    sh, temp = self.head, self.temperature
    hidden = sh.hidden_fn(params, batch["inputs"], train=True,
                          rngs={"dropout": rng})
    kernel, bias = sh.output_embedding(params)
    h = hidden.reshape(-1, hidden.shape[-1]).astype(jnp.float32)
    labels = batch["labels"].reshape(-1)
    weights = batch["weights"].reshape(-1)
    t_hidden, t_kernel, t_bias = (target["hidden"], target["kernel"],
                                  target["bias"])
    teacher_weights = target["weights"]
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
        prior_mix=sh.prior_mix, uniform_mix=sh.uniform_mix,
        unigram=sh.unigram)
    sample = sampling.systematic_sample(rng_sample, q, sh.num_samples)

    # The estimators on [N, K + 1] logits.
    log_w = sampling.column_log_weights(sample, labels)
    z = sampling.sampled_logits(h, kernel, bias, sample.ids, labels)
    t_z = jax.vmap(sampling.sampled_logits, (0, 0, 0, None, None))(
        t_hidden, t_kernel, t_bias, sample.ids, labels) / temp
    # An empty slot gets weight 0; all-empty keeps the forward finite (the
    # step zeroes the term then).
    t_weights = jnp.where(jnp.sum(teacher_weights) > 0, teacher_weights, 1.0)
    t_log_probs = sampling.sampled_teacher_log_probs(t_z, log_w, t_weights)
    per_position = sampling.sampled_divergence(
        z, t_log_probs, log_w, self.divergence, temp)
    d = losses.weighted_mean(per_position, weights)
    if sh.task_loss:
      task = losses.weighted_mean(sampling.sampled_task_loss(z, log_w),
                                  weights)
      aux = {"task_loss": task}
    else:
      logits = (h @ kernel + bias[None]).reshape(hidden.shape[:-1] + (-1,))
      task, aux = student.loss_fn(logits, batch)
    return task, d, {**aux, "sampled_classes": jnp.sum(sample.valid)}

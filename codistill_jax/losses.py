"""Task losses and distillation divergences: pure functions of arrays.

Conventions (DESIGN.md): per-example terms are summed over classes; a batch is
reduced by a weighted mean over examples (or over non-padding tokens for
sequences) with the batch's `weights`, so padding never counts.
"""

import jax
import jax.numpy as jnp
import optax

from codistill_jax import config_lib

TASK_LOSSES = ("softmax_xent", "sigmoid_xent")
DIVERGENCES = ("kl", "xent", "mse")


def check_config(config) -> None:
  """config.loss and config.codistill.divergence name losses defined here."""
  config_lib.check_choice(config, "loss", TASK_LOSSES)
  config_lib.check_choice(config, "codistill.divergence", DIVERGENCES)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean of `values` over entries with weight > 0 (0 if there are none)."""
  total = jnp.sum(weights)
  return jnp.sum(values * weights) / jnp.maximum(total, 1e-12)


def softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example (or per-token) cross-entropy; logits [..., C], labels [...]."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example binary cross-entropy (log-loss); logits and labels [...]."""
  return optax.sigmoid_binary_cross_entropy(
      logits.astype(jnp.float32), labels.astype(jnp.float32))


def task_loss(name: str):
  """Returns `loss(logits, labels, weights) -> scalar` for a task loss name."""
  per_example = {"softmax_xent": softmax_xent, "sigmoid_xent": sigmoid_xent}[name]

  def loss(logits, labels, weights):
    return weighted_mean(per_example(logits, labels), weights)

  return loss


# ----------------------------------------------------------------------------
# Distillation.
# ----------------------------------------------------------------------------


def teacher_targets(teacher_logits: jax.Array, peer_weights: jax.Array,
                    temperature: float, binary: bool):
  """Averages peers: the target is the mean of peer *probabilities*.

  Args:
    teacher_logits: [n_peers, ...] logits of each peer on the student's batch.
    peer_weights: [n_peers] >= 0; 0 for a peer that has published nothing yet.
    temperature: softmax/sigmoid temperature T.
    binary: one sigmoid logit per example instead of a softmax over classes.

  Returns:
    (mean probabilities, mean logits, has_teacher, entropy): gradients are
    stopped; `entropy` is the per-example entropy of the target (None for
    binary targets), from the teacher's log-probabilities when there is one
    teacher (no extra log over classes).
  """
  teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  scaled = teacher_logits / temperature
  if binary:
    probs = jax.nn.sigmoid(scaled)
  else:
    log_probs = jax.nn.log_softmax(scaled, -1)
    probs = jnp.exp(log_probs)
  total = jnp.sum(peer_weights)
  w = peer_weights / jnp.maximum(total, 1e-12)
  mean_probs = jnp.tensordot(w, probs, axes=1)
  mean_logits = jnp.tensordot(w, teacher_logits, axes=1)
  entropy = None
  if not binary:
    if teacher_logits.shape[0] == 1:  # Reuse log-probs: no second pass.
      entropy = -jnp.sum(mean_probs * log_probs[0], -1)
    else:
      entropy = -jnp.sum(jax.scipy.special.xlogy(mean_probs, mean_probs), -1)
  return mean_probs, mean_logits, total > 0, entropy


def distill_divergence(student_logits: jax.Array, teacher_probs: jax.Array,
                       teacher_logits: jax.Array, *, divergence: str,
                       temperature: float, binary: bool,
                       teacher_entropy: jax.Array | None = None) -> jax.Array:
  """Per-example (per-token) D(teacher || student), summed over classes.

  'kl' and 'xent' (soft cross-entropy) have the same gradient; both are scaled
  by T^2 so that their gradient magnitude does not shrink with T. 'mse' is the
  squared difference of logits (no temperature). `teacher_entropy` (from
  `teacher_targets`) saves a log over classes; computed here if None.
  """
  z = student_logits.astype(jnp.float32)
  if divergence == "mse":
    sq = jnp.square(z - teacher_logits)
    return sq if binary else jnp.sum(sq, -1)
  z = z / temperature
  p = teacher_probs
  if binary:
    # Two-class distributions (p, 1-p) against (sigmoid z, 1 - sigmoid z).
    xent = -(p * jax.nn.log_sigmoid(z) + (1 - p) * jax.nn.log_sigmoid(-z))
    entropy = -(jax.scipy.special.xlogy(p, p) +
                jax.scipy.special.xlogy(1 - p, 1 - p))
  else:
    # -sum p log_softmax(z) = lse(z) - sum p z, as sum p = 1: no [.., C]
    # log-probabilities materialised, and the gradient is softmax(z) - p.
    xent = jax.nn.logsumexp(z, -1) - jnp.sum(p * z, -1)
    entropy = teacher_entropy
    if entropy is None and divergence == "kl":
      entropy = -jnp.sum(jax.scipy.special.xlogy(p, p), -1)
  per_example = xent - entropy if divergence == "kl" else xent
  return per_example * temperature**2


def alpha_schedule(alpha: float, burn_in_steps: int, ramp_steps: int = 0):
  """alpha(step): 0 during burn-in, then a linear ramp to `alpha`."""

  def fn(step):
    after = jnp.asarray(step, jnp.float32) - burn_in_steps
    ramp = jnp.clip((after + 1) / max(ramp_steps, 1), 0.0, 1.0)
    return jnp.where(after >= 0, alpha * ramp, 0.0)

  return fn


def agreement(student_logits: jax.Array, teacher_probs: jax.Array,
              weights: jax.Array, binary: bool) -> dict[str, jax.Array]:
  """How close the student is to its teacher target on this batch.

  Top-1 agreement for softmax outputs; mean |p_student - p_teacher| for one
  sigmoid output (the CTR form of churn).
  """
  z = jax.lax.stop_gradient(student_logits.astype(jnp.float32))
  if binary:
    diff = jnp.abs(jax.nn.sigmoid(z) - teacher_probs)
    return {"peer_abs_diff": weighted_mean(diff, weights)}
  # Does the student's top logit sit on the teacher's top class? Written with
  # max-reductions: argmax over a large vocabulary is several times slower
  # on CPU, and this runs every step.
  top_p = jnp.max(teacher_probs, -1, keepdims=True)
  z_at_teacher_top = jnp.max(jnp.where(teacher_probs >= top_p, z, -jnp.inf),
                             -1)
  same = z_at_teacher_top >= jnp.max(z, -1)
  return {"peer_agreement": weighted_mean(same.astype(jnp.float32), weights)}

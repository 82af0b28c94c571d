"""Task losses and distillation divergences: pure functions of arrays.

Conventions (DESIGN.md): per-example terms are summed over classes; a batch is
reduced by a weighted mean over examples (or over non-padding tokens for
sequences) with the batch's `weights`, so padding never counts.
"""

import jax
import jax.numpy as jnp
import optax

TASK_LOSSES = ("softmax_xent", "sigmoid_xent")


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

r"""The gradient noise scale (McCandlish et al. 2018): where sync stops paying.

B_simple = tr(Sigma) / |G|^2 estimates the critical batch size: well below it,
doubling a group's batch nearly halves the steps to a target (synchronous
data parallelism pays); well above it, a bigger batch buys almost no steps,
and extra workers are better spent elsewhere (codistillation, averaging). In
the paper's model the steps S and examples E to a target trade off as

    S / S_min = 1 + B_noise / B,      E / E_min = 1 + B / B_noise,

so doubling B from B cuts the steps by (1 + Bn / B) / (1 + Bn / 2B).

Both quantities come from squared gradient norms at two batch sizes (their
Appendix A): a group's batch of B rows is cut into k pieces of B / k rows,
each piece's gradient taken by itself (`jax.vmap` over pieces; with k = the
devices of the group's 'data' axis every device holds one piece, so this is
the per-device gradient a data-parallel step already computes) and their
mean is the gradient of the whole batch:

    |G|^2   ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(S)   ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)        (b = B / k)

Each is noisy per step; the ratio is taken of their means over a log window
(the paper averages each with an EMA before dividing). The gradient is of the
task loss on the training batch with dropout on: the noise of what the
optimizer follows, distillation left out.

The trainer measures it every `config.noise_scale.every` steps (0: never), on
that step's batch and params, in its own jitted program: the cost is one
extra forward and backward pass per measurement (1 / every of the training
compute, e.g. 2% at every = 50) and k gradients' memory. `python -m
codistill_jax.tools.noise_scale` prints a run's critical batch size over
training.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from codistill_jax.errors import ConfigError


PREFIX = "noise_scale/"


def check_config(config) -> None:
  """config.noise_scale: measured at least once in the run when on."""
  every = config.noise_scale.every
  if every > config.total_steps:
    raise ConfigError(
        f"config.noise_scale.every={every} never acts: the first "
        f"measurement would come after config.total_steps="
        f"{config.total_steps}; use at most {config.total_steps} (0: off)")


def make_noise_scale_fn(apply_fn: Callable[..., jax.Array],
                        loss_fn: Callable, pieces: int):
  """Returns `noise_scale(params, batch, rng) -> {name: scalar}` (pure).

  Args:
    apply_fn: `apply_fn(params, inputs, train=..., rngs=...) -> logits`.
    loss_fn: `loss_fn(logits, batch) -> (loss, metrics)` (the task loss).
    pieces: k >= 2 contiguous pieces of the batch (rows 0..B/k-1 are piece
      0, so with k data devices each device holds one piece).

  The metrics are the two estimates (`grad_sq`, `trace`) and the batch sizes
  they were measured at, in rows; `summarize` turns means of them into
  B_simple.
  """
  k = pieces

  def noise_scale(params, batch, rng):
    split = jax.tree.map(
        lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)

    def piece_grad(piece, i):
      def loss(p):
        logits = apply_fn(p, piece["inputs"], train=True,
                          rngs={"dropout": jax.random.fold_in(rng, i)})
        return loss_fn(logits, piece)[0]
      return jax.grad(loss)(params)

    grads = jax.vmap(piece_grad)(split, jnp.arange(k))
    sq = lambda tree: sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                          for x in jax.tree.leaves(tree))
    small_sq = jnp.mean(jax.vmap(sq)(grads))  # E|G_b|^2 over the pieces.
    big_sq = sq(jax.tree.map(lambda g: jnp.mean(g.astype(jnp.float32), 0),
                             grads))
    rows = jax.tree.leaves(batch)[0].shape[0]
    b, big = rows / k, float(rows)
    grad_sq = (big * big_sq - b * small_sq) / (big - b)
    trace = (small_sq - big_sq) / (1.0 / b - 1.0 / big)
    return {f"{PREFIX}grad_sq": grad_sq, f"{PREFIX}trace": trace}

  return noise_scale


def summarize(means: dict[str, float], batch_size: int) -> dict[str, float]:
  """B_simple (rows) and what doubling `batch_size` would buy, from window
  means of `make_noise_scale_fn`'s metrics (other keys are ignored)."""
  grad_sq = means.get(f"{PREFIX}grad_sq")
  trace = means.get(f"{PREFIX}trace")
  if grad_sq is None or trace is None:
    return {}
  # |G|^2 can come out <= 0 when the noise swamps the signal (late in
  # training, or over too few measurements): B_simple is then unbounded.
  b_simple = trace / grad_sq if grad_sq > 0 else float("inf")
  return {f"{PREFIX}b_simple": b_simple,
          f"{PREFIX}doubling_speedup": doubling_speedup(b_simple,
                                                        batch_size)}


def doubling_speedup(b_noise: float, batch_size: float) -> float:
  """Steps to a target at B over those at 2B, in McCandlish et al.'s model:
  2 while B << B_noise, 1 once B >> B_noise."""
  if not np.isfinite(b_noise):
    return 2.0
  b_noise = max(b_noise, 0.0)
  return (1 + b_noise / batch_size) / (1 + b_noise / (2 * batch_size))

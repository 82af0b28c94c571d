"""Importance-sampled distillation for large output spaces; sparse top-k targets.

With a vocabulary of V classes the output layer dominates distillation: the
student's and every teacher's logits, softmaxes and the gradient are all
[positions, V]. Following Li et al. 2018 (arXiv 1812.00914), the distillation
(and, optionally, the task) loss is estimated on K << V classes drawn from a
proposal built from the teacher-student interaction.

The estimator, per position n with student logits z and teacher logits t
(temperature T, all divided by T below):

  KL(p || q) = sum_c p_c log p_c - sum_c p_c z_c + log sum_c exp(z_c)

Every term is a sum over classes. One shared set S of K classes is drawn per
batch by systematic PPS sampling (a fixed-size design without replacement in
which class c is included with probability exactly pi_c = min(1, lambda q_c),
sum_c pi_c = K, for the proposal q). Each position also keeps its own label y
(pi = 1), and a sampled class equal to the label is dropped from that position
(no double count). A sum over classes is estimated by the Horvitz-Thompson sum
`sum_{c in S} f(c) / pi_c`, which is exactly unbiased; a log-partition function
by `logsumexp_{c in S}(x_c - log pi_c)`, the standard sampled-softmax
correction (with pi_c = K q_c when no class is capped), which is consistent
and whose O(1/K) bias the tests bound. K = V includes every class with
pi = 1, and the estimate is the full loss exactly.

Only [positions, K + 1] logits are formed for the loss and its gradient
(`hidden @ kernel[:, S]`); the proposal itself looks at the full distributions
of `proposal_positions` (default 64) positions of the batch only, so the full
batch x length x V softmax is never materialised.

Proposals (batch level, `PROPOSALS`):
  'dynamic'  classes ranked by teacher-student disagreement sum |p_t - p_s|,
             a mixture of Laplace shapes over the ranks (favouring the top
             ranks), mixed with the teacher prior by `prior_mix` (Li et al.).
  'teacher'  the teacher's mean probabilities (a fixed teacher-based proposal).
  'unigram'  class frequencies given by the data; 'uniform'.
Every proposal is mixed with `uniform_mix` of the uniform distribution, so that
every class has pi_c > 0 (otherwise the estimator would miss its mass).

Sparse targets (`topk_target`, `topk_divergence`): the k largest teacher
probabilities and a tail bucket holding the remaining mass; the KL between the
(k + 1)-bucket coarsenings of teacher and student. The common variant that
renormalises the k probabilities and drops the tail ('renormalize') is biased:
it teaches the student to put no mass outside the top k; it is kept as a named
option for comparison only.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from codistill_jax import config_lib
from codistill_jax.errors import ConfigError

PROPOSALS = ("dynamic", "teacher", "unigram", "uniform")
TOPK_MODES = ("tail", "renormalize")


def check_config(config) -> None:
  """config.codistill.topk / topk_mode and config.codistill.sampled.

  Ranges are in config_lib.RANGES; whether the model has a sampled output
  layer is checked where the term is built (build.py).
  """
  cd, sm = config.codistill, config.codistill.sampled
  name = "config.codistill.sampled"
  config_lib.check_choice(config, "codistill.topk_mode", TOPK_MODES)
  # Checked with K = 0 too, like every choice: a typo is refused at once.
  config_lib.check_choice(config, "codistill.sampled.proposal", PROPOSALS)
  if cd.topk and config.loss != "softmax_xent":
    raise ConfigError(f"config.codistill.topk={cd.topk} needs a softmax model "
                      "(config.loss='softmax_xent'); use 0")
  if not sm.num_samples:
    return
  vocab = config.data.get("vocab_size")
  if isinstance(vocab, int) and sm.num_samples > vocab:
    raise ConfigError(f"{name}.num_samples={sm.num_samples} exceeds "
                      f"config.data.vocab_size={vocab}; use at most {vocab}")
  problem = (
      "config.loss must be 'softmax_xent'" if config.loss != "softmax_xent"
      else "config.codistill.topk must be 0" if cd.topk
      else "config.codistill.divergence must be 'kl' or 'xent'"
      if cd.divergence not in ("kl", "xent") else None)
  if problem:
    raise ConfigError(f"{name}.num_samples={sm.num_samples}: {problem} (or set "
                      "num_samples=0)")

# Laplace scales of the rank-based proposal, as fractions of K: a mixture of a
# sharp, a medium and a broad decay over the disagreement ranks.
LAPLACE_SCALES = (0.25, 1.0, 4.0)


@dataclasses.dataclass(frozen=True)
class SampledHead:
  """How to reach the output layers and sample their classes (static).

  A model supports sampling when it exposes its final hidden states and its
  output embedding (`hidden @ kernel + bias == logits`).
  """
  hidden_fn: Callable[..., jax.Array]  # (params, x, train, rngs) -> [.., d].
  output_embedding: Callable[[Any], tuple[jax.Array, jax.Array]]
  teacher_hidden_fn: Callable[..., jax.Array] | None = None  # (params, x).
  teacher_output_embedding: Callable[[Any], tuple[jax.Array, jax.Array]] | None = None
  num_samples: int = 1024  # K shared classes per batch (+ each label).
  proposal: str = "dynamic"  # One of PROPOSALS.
  prior_mix: float = 0.5  # 'dynamic': weight of the teacher prior.
  uniform_mix: float = 0.05  # Weight of the uniform floor; > 0.
  proposal_positions: int = 64  # Positions whose full distributions shape q.
  unigram: Any = None  # [V] class frequencies, for 'unigram'.
  task_loss: bool = True  # Also estimate the task loss on the sampled set.


# ----------------------------------------------------------------------------
# Proposal and sampling.
# ----------------------------------------------------------------------------
def rank_proposal(disagreement: jax.Array, num_samples: int) -> jax.Array:
  """A mixture of Laplace shapes over the ranks of `disagreement` [V]."""
  v = disagreement.shape[-1]
  order = jnp.argsort(-disagreement)
  ranks = jnp.zeros((v,), jnp.float32).at[order].set(
      jnp.arange(v, dtype=jnp.float32))
  shape = sum(jnp.exp(-ranks / (s * num_samples)) / (s * num_samples)
              for s in LAPLACE_SCALES)
  return shape / jnp.sum(shape)


def proposal(kind: str, *, num_samples: int, vocab_size: int,
             teacher_probs: jax.Array | None = None,
             student_probs: jax.Array | None = None,
             prior_mix: float = 0.5, uniform_mix: float = 0.05,
             unigram: jax.Array | None = None) -> jax.Array:
  """The batch-level proposal q [V] (sums to 1, every entry > 0).

  Args:
    kind: one of PROPOSALS.
    num_samples: K (sets the Laplace scales of 'dynamic').
    vocab_size: V.
    teacher_probs, student_probs: [M, V] full distributions at a few positions
      ('dynamic' needs both, 'teacher' the first); gradients are stopped.
    prior_mix: 'dynamic': q = (1 - prior_mix) rank shape + prior_mix teacher.
    uniform_mix: weight of the uniform floor mixed into every proposal.
    unigram: [V] class frequencies for 'unigram'.
  """
  if kind == "uniform":
    q = jnp.full((vocab_size,), 1.0 / vocab_size)
  elif kind == "unigram":
    q = unigram / jnp.sum(unigram)
  else:
    prior = jnp.mean(jax.lax.stop_gradient(teacher_probs), 0)
    if kind == "teacher":
      q = prior
    else:
      disagreement = jnp.mean(jnp.abs(jax.lax.stop_gradient(
          teacher_probs - student_probs)), 0)
      q = ((1 - prior_mix) * rank_proposal(disagreement, num_samples) +
           prior_mix * prior)
  q = q.astype(jnp.float32)
  total = jnp.sum(q)  # 0 before any teacher exists: fall back to uniform.
  q = jnp.where(total > 0, q / jnp.maximum(total, 1e-30), 1.0 / vocab_size)
  return (1 - uniform_mix) * q + uniform_mix / vocab_size


def inclusion_probabilities(q: jax.Array, num_samples: int) -> jax.Array:
  """pi_c = min(1, lambda q_c) with sum_c pi_c = K (for q > 0, K <= V).

  The classes so likely that lambda q_c >= 1 are certain (pi = 1); lambda
  spreads the remaining K - m inclusions over the rest in proportion to q.
  """
  k = num_samples
  top = jax.lax.top_k(q, k)[0]  # q sorted down, first K.
  # tail[m] = sum of q without its m largest, summed from the small end: a
  # difference of large sums would cancel and can exceed top[m].
  rest = (0.0 if k == q.shape[-1] else
          jnp.maximum(jnp.sum(q) - jnp.sum(top), 0.0))
  tail = rest + jnp.cumsum(top[::-1])[::-1]
  m = jnp.arange(k)
  lam = (k - m) / jnp.maximum(tail, 1e-30)  # With the m largest capped.
  # The smallest m for which the largest uncapped class stays <= 1 (capping
  # one more class while it is > 1 only raises lambda); m = K - 1 always
  # qualifies, as tail[K-1] >= top[K-1].
  ok = lam * top <= 1
  lam = lam[jnp.argmax(ok)]
  return jnp.minimum(1.0, lam * q)



class Sample(NamedTuple):
  """K classes shared by a batch, with their inclusion probabilities."""
  ids: jax.Array  # [K] int32 class ids, distinct where `valid`.
  log_pi: jax.Array  # [K] log inclusion probability of each id.
  valid: jax.Array  # [K] bool; False for the (rare) unused last slots.


def systematic_sample(rng: jax.Array, q: jax.Array, num_samples: int) -> Sample:
  """Draws K distinct classes, class c with probability exactly pi_c.

  Systematic PPS sampling: lay the classes' pi_c (each <= 1) end to end on
  [0, K) and take the classes under the points u, u + 1, ..., u + K - 1 for
  one uniform u. The pi are quantised to multiples of 1/scale and summed in
  int32 so that the cumulative sum is exact at V = 128k; the returned log_pi
  are those of the quantised design, so the Horvitz-Thompson weights are
  exact for the design actually sampled. Rounding down can leave the last
  slot(s) past the end: they come back with valid = False.
  """
  k = num_samples
  pi = inclusion_probabilities(q, k)
  scale = (2**30) // k
  units = jnp.floor(pi * scale).astype(jnp.int32)
  ends = jnp.cumsum(units)  # Exact: sum <= K * scale <= 2^30.
  u = jax.random.randint(rng, (), 0, scale, jnp.int32)
  points = u + jnp.arange(k, dtype=jnp.int32) * scale
  ids = jnp.searchsorted(ends, points, side="right").astype(jnp.int32)
  valid = points < ends[-1]
  ids = jnp.minimum(ids, q.shape[-1] - 1)
  log_pi = jnp.log(units[ids].astype(jnp.float32) / scale)
  return Sample(ids, log_pi, valid)


# ----------------------------------------------------------------------------
# Sampled logits and the corrected estimators.
# ----------------------------------------------------------------------------
def sampled_logits(hidden: jax.Array, kernel: jax.Array, bias: jax.Array,
                   ids: jax.Array, labels: jax.Array) -> jax.Array:
  """[N, K + 1] logits: column 0 each position's label, then the K samples.

  Args:
    hidden: [N, d] final hidden states.
    kernel, bias: the output embedding, [d, V] and [V].
    ids: [K] sampled classes (shared by all N positions).
    labels: [N] int labels.
  """
  kernel = kernel.astype(hidden.dtype)
  label_logits = jnp.einsum("nd,dn->n", hidden, kernel[:, labels]) + bias[
      labels]
  shared = hidden @ kernel[:, ids] + bias[ids][None, :]
  return jnp.concatenate([label_logits[:, None], shared], -1)


def column_log_weights(sample: Sample, labels: jax.Array) -> jax.Array:
  """[N, K + 1] log(1 / pi) per column; -inf drops a column.

  Column 0 (the label) is certain; a sampled class is dropped where it is
  the position's label (already counted) or an unused slot.
  """
  keep = sample.valid[None, :] & (sample.ids[None, :] != labels[:, None])
  shared = jnp.where(keep, -sample.log_pi[None, :], -jnp.inf)
  return jnp.concatenate([jnp.zeros((labels.shape[0], 1)), shared], -1)


def sampled_log_partition(logits: jax.Array, log_w: jax.Array) -> jax.Array:
  """log sum_c exp(logits_c), estimated: logsumexp(logits + log(1 / pi))."""
  return jax.nn.logsumexp(logits + log_w, -1)


def sampled_teacher_log_probs(teacher_logits: jax.Array, log_w: jax.Array,
                              teacher_weights: jax.Array) -> jax.Array:
  """log of the mean teacher distribution at the sampled columns [N, K + 1].

  Args:
    teacher_logits: [n_teachers, N, K + 1] (already divided by T).
    log_w: [N, K + 1] from `column_log_weights`.
    teacher_weights: [n_teachers] >= 0 (0 = empty slot).
  """
  log_p = teacher_logits - sampled_log_partition(
      teacher_logits, log_w[None])[..., None]
  w = teacher_weights / jnp.maximum(jnp.sum(teacher_weights), 1e-12)
  # log sum_i w_i p_i, stably; an empty slot has log w = -inf.
  log_w_t = jnp.where(w > 0, jnp.log(jnp.maximum(w, 1e-30)), -jnp.inf)
  return jax.nn.logsumexp(log_p + log_w_t[:, None, None], 0)


def sampled_divergence(student_logits: jax.Array, teacher_log_probs: jax.Array,
                       log_w: jax.Array, divergence: str = "kl",
                       temperature: float = 1.0) -> jax.Array:
  """Per-position estimate of D(teacher || student) over all classes.

  `sum_c p_c (log p_c - z_c)` by Horvitz-Thompson over the sampled columns,
  plus the sampled log-partition of z; scaled by T^2 like the full form.

  Args:
    student_logits: [N, K + 1] sampled student logits (not yet divided by T).
    teacher_log_probs: [N, K + 1] from `sampled_teacher_log_probs`.
    log_w: [N, K + 1] from `column_log_weights`.
    divergence: 'kl' or 'xent' (the same gradient).
    temperature: T.
  """
  z = student_logits.astype(jnp.float32) / temperature
  p_over_pi = jnp.exp(teacher_log_probs + log_w)  # 0 in dropped columns.
  inner = -z if divergence == "xent" else teacher_log_probs - z
  inner = jnp.where(jnp.isfinite(log_w), inner, 0.0)
  per_position = jnp.sum(p_over_pi * inner, -1) + sampled_log_partition(
      z, log_w)
  return per_position * temperature**2


def sampled_task_loss(student_logits: jax.Array, log_w: jax.Array) -> jax.Array:
  """Per-position sampled-softmax cross-entropy with the label (column 0)."""
  z = student_logits.astype(jnp.float32)
  return sampled_log_partition(z, log_w) - z[:, 0]


# ----------------------------------------------------------------------------
# Sparse top-k teacher targets.
# ----------------------------------------------------------------------------
def topk_target(teacher_probs: jax.Array, k: int) -> dict[str, jax.Array]:
  """The k largest probabilities of [..., V]; 1 - their sum is the tail."""
  probs, ids = jax.lax.top_k(jax.lax.stop_gradient(teacher_probs), k)
  return {"topk_ids": ids.astype(jnp.int32),
          "topk_probs": probs.astype(jnp.float32)}


def topk_divergence(student_logits: jax.Array, topk_ids: jax.Array,
                    topk_probs: jax.Array, *, mode: str = "tail",
                    divergence: str = "kl",
                    temperature: float = 1.0) -> jax.Array:
  """Per-example D(teacher || student) against a sparse top-k target.

  'tail': the KL between the (k + 1)-bucket coarsenings (the k classes and
  everything else) of teacher and student; a lower bound of the full KL that
  is exact when the teacher's tail is shaped like the student's. 'renormalize'
  (biased, for comparison): the k probabilities rescaled to sum to 1 and the
  tail dropped, so the student is pulled to put no mass outside them.

  Args:
    student_logits: [..., V] full student logits (not divided by T).
    topk_ids, topk_probs: [..., k] the target (probabilities at temperature T).
    mode: one of TOPK_MODES.
    divergence: 'kl' or 'xent' (the same gradient).
    temperature: T.
  """
  z = student_logits.astype(jnp.float32) / temperature
  lse = jax.nn.logsumexp(z, -1, keepdims=True)
  log_q = jnp.take_along_axis(z, topk_ids, -1) - lse
  p = jax.lax.stop_gradient(topk_probs.astype(jnp.float32))
  xlogy = jax.scipy.special.xlogy
  if mode == "renormalize":
    p = p / jnp.maximum(jnp.sum(p, -1, keepdims=True), 1e-12)
    xent = -jnp.sum(p * log_q, -1)
    entropy = -jnp.sum(xlogy(p, p), -1)
  elif topk_ids.shape[-1] == z.shape[-1]:  # k = V: no tail; the full KL.
    xent = -jnp.sum(p * log_q, -1)
    entropy = -jnp.sum(xlogy(p, p), -1)
  else:
    p_tail = jnp.clip(1.0 - jnp.sum(p, -1), 0.0, 1.0)
    rest = jnp.put_along_axis(z, topk_ids, -jnp.inf, axis=-1, inplace=False)
    log_q_tail = jax.nn.logsumexp(rest, -1) - lse[..., 0]
    xent = -jnp.sum(p * log_q, -1) - p_tail * log_q_tail
    entropy = -jnp.sum(xlogy(p, p), -1) - xlogy(p_tail, p_tail)
  per_example = xent - entropy if divergence == "kl" else xent
  return per_example * temperature**2

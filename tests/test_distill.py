"""DESIGN.md's loss contracts for (co)distillation, on tiny models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from codistill_jax import distill as distill_lib
from codistill_jax import losses
from codistill_jax import step as step_lib


class Net(nn.Module):
  classes: int = 5
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.classes)(x)


def _setup(alpha=1.0, burn_in=0, student_dropout=0.0, teacher_dropout=0.0,
           lr=0.1, n_teachers=2, task_weight=1.0, divergence="kl", t=1.0):
  student, teacher = Net(dropout=student_dropout), Net(dropout=teacher_dropout)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
  batch = {"inputs": x, "labels": jnp.arange(8) % 5, "weights": jnp.ones(8)}
  tx = optax.sgd(lr)
  state = step_lib.init_state(student, tx, jax.random.PRNGKey(1), x[:1])
  tparams = [teacher.init(jax.random.PRNGKey(10 + i), x[:1], train=False)
             for i in range(n_teachers)]
  teachers = step_lib.Teachers(
      params=jax.tree.map(lambda *a: jnp.stack(a), *tparams),
      weights=jnp.ones(n_teachers))
  task = losses.task_loss("softmax_xent")

  def loss_fn(logits, b):
    loss = task_weight * task(logits, b["labels"], b["weights"])
    return loss, {"task_loss": loss}

  distill = distill_lib.Dense(teacher.apply,
                              losses.alpha_schedule(alpha, burn_in),
                              divergence=divergence, temperature=t)
  step = step_lib.make_train_step(student.apply, loss_fn, tx, distill=distill)
  plain = step_lib.make_train_step(student.apply, loss_fn, tx)
  return state, batch, teachers, jax.jit(step), jax.jit(plain)


def test_no_gradient_flows_into_teachers():
  state, batch, teachers, step, _ = _setup()

  def loss_of_teachers(tparams):
    _, m = step(state, batch, teachers.replace(params=tparams))
    return m["loss"]

  g = jax.grad(loss_of_teachers)(teachers.params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))
  # ... while the loss really depends on the teachers.
  other = jax.tree.map(lambda x: x + 1.0, teachers.params)
  assert float(loss_of_teachers(other)) != float(
      loss_of_teachers(teachers.params))


def test_student_logits_are_not_stopped():
  # Task loss off: any update comes from the distillation term alone.
  state, batch, teachers, step, _ = _setup(task_weight=0.0)
  new, m = step(state, batch, teachers)
  assert float(m["grad_norm"]) > 0 and float(m["distill_loss"]) > 0
  delta = jax.tree.map(lambda a, b: jnp.abs(a - b).max(), new.params,
                       state.params)
  assert max(float(d) for d in jax.tree.leaves(delta)) > 0


def test_teacher_target_is_mean_of_probabilities_not_logits():
  a = jnp.array([[4.0, 0.0, 0.0]])
  b = jnp.array([[0.0, 0.0, 4.0]])
  probs, logits, has, _ = losses.teacher_targets(jnp.stack([a, b]),
                                                 jnp.ones(2), 1.0, False)
  np.testing.assert_allclose(
      probs, (jax.nn.softmax(a) + jax.nn.softmax(b)) / 2, rtol=1e-6)
  assert not np.allclose(probs, jax.nn.softmax((a + b) / 2))
  np.testing.assert_allclose(logits, (a + b) / 2)
  assert bool(has)
  # A peer with weight 0 (nothing published yet) does not count.
  probs, _, _, _ = losses.teacher_targets(
      jnp.stack([a, b]), jnp.array([1., 0.]), 1.0, False)
  np.testing.assert_allclose(probs, jax.nn.softmax(a), rtol=1e-6)
  _, _, has, _ = losses.teacher_targets(jnp.stack([a, b]), jnp.zeros(2),
                                        1.0, False)
  assert not bool(has)


@pytest.mark.parametrize("t", [1.0, 3.0])
def test_kl_sums_classes_scales_by_t_squared_and_masks_tokens(t):
  rng = np.random.default_rng(0)
  zs = rng.normal(size=(2, 3, 4)).astype(np.float32)  # [batch, tokens, V]
  zt = rng.normal(size=(2, 3, 4)).astype(np.float32)
  w = np.array([[1, 1, 0], [1, 0, 0]], np.float32)  # Padding tokens.
  pt = np.exp(zt / t) / np.exp(zt / t).sum(-1, keepdims=True)
  ps = np.exp(zs / t) / np.exp(zs / t).sum(-1, keepdims=True)
  kl = (pt * (np.log(pt) - np.log(ps))).sum(-1) * t**2
  want = (kl * w).sum() / w.sum()
  per = losses.distill_divergence(zs, jnp.asarray(pt), None, divergence="kl",
                                  temperature=t, binary=False)
  got = losses.weighted_mean(per, w)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Soft cross-entropy = KL + teacher entropy: same gradient, different value.
  xent = losses.distill_divergence(zs, jnp.asarray(pt), None,
                                   divergence="xent", temperature=t,
                                   binary=False)
  ent = -(pt * np.log(pt)).sum(-1) * t**2
  np.testing.assert_allclose(xent, kl + ent, rtol=1e-5)


def test_kl_and_xent_have_the_same_gradient():
  zs = jnp.array([[0.5, -1.0, 2.0]])
  pt = jnp.array([[0.2, 0.3, 0.5]])
  grads = [jax.grad(lambda z, d=d: losses.distill_divergence(
      z, pt, None, divergence=d, temperature=2.0, binary=False).sum())(zs)
           for d in ("kl", "xent")]
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6)


def test_binary_kl_matches_two_class_softmax_kl():
  zs, zt = jnp.array([0.3, -1.2]), jnp.array([1.0, 0.5])
  pt = jax.nn.sigmoid(zt)
  got = losses.distill_divergence(zs, pt, zt, divergence="kl", temperature=1.0,
                                  binary=True)
  two = lambda z: jnp.stack([z, jnp.zeros_like(z)], -1)  # sigmoid = softmax.
  want = losses.distill_divergence(two(zs), jax.nn.softmax(two(zt)), None,
                                   divergence="kl", temperature=1.0,
                                   binary=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_mse_is_on_logits_summed_over_classes():
  zs, zt = jnp.array([[1.0, 2.0]]), jnp.array([[0.0, 4.0]])
  got = losses.distill_divergence(zs, None, zt, divergence="mse",
                                  temperature=5.0, binary=False)
  np.testing.assert_allclose(got, [5.0])


def test_teachers_are_deterministic_even_with_dropout():
  # lr 0: the student never changes, so the distill loss can only move if the
  # teacher's output does.
  state, batch, teachers, step, _ = _setup(teacher_dropout=0.5, lr=0.0)
  s1, m1 = step(state, batch, teachers)
  _, m2 = step(s1, batch, teachers)
  assert float(m1["distill_loss"]) == float(m2["distill_loss"])


def test_alpha_zero_and_burn_in_equal_the_plain_step_bitwise():
  for kwargs in ({"alpha": 0.0}, {"burn_in": 5}):
    state, batch, teachers, step, plain = _setup(**kwargs)
    a, b = state, state
    for _ in range(3):
      a, ma = step(a, batch, teachers)
      b, _ = plain(b, batch)
      assert float(ma["alpha"]) == 0.0
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
      np.testing.assert_array_equal(x, y)


def test_alpha_schedule_burn_in_then_ramp():
  fn = losses.alpha_schedule(0.5, burn_in_steps=10, ramp_steps=4)
  got = [float(fn(s)) for s in (0, 9, 10, 11, 13, 100)]
  assert got == [0.0, 0.0, 0.125, 0.25, 0.5, 0.5]


def test_one_teacher_entropy_shortcut_matches_xlogy():
  t = jax.random.normal(jax.random.PRNGKey(3), (1, 4, 7)) * 3
  zs = jax.random.normal(jax.random.PRNGKey(4), (4, 7))
  for temp in (1.0, 2.5):
    p, _, _, ent = losses.teacher_targets(t, jnp.ones(1), temp, False)
    np.testing.assert_allclose(
        ent, -jnp.sum(jax.scipy.special.xlogy(p, p), -1), rtol=1e-5)
    fast = losses.distill_divergence(zs, p, None, divergence="kl",
                                     temperature=temp, binary=False,
                                     teacher_entropy=ent)
    slow = losses.distill_divergence(zs, p, None, divergence="kl",
                                     temperature=temp, binary=False)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)


def test_peer_agreement_is_top1_agreement():
  zs = jax.random.normal(jax.random.PRNGKey(5), (50, 9))
  pt = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(6), (50, 9)) * 2)
  w = jnp.ones(50).at[:5].set(0.0)
  want = np.average(np.argmax(zs, -1) == np.argmax(pt, -1), weights=w)
  got = losses.agreement(zs, pt, w, binary=False)["peer_agreement"]
  np.testing.assert_allclose(got, want, rtol=1e-6)

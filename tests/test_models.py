"""Tests of the model protocol, on tiny versions of every model.

What the rest of the code relies on: logits of the documented shape in float32;
`train=False` deterministic (teachers) and dropout driven by the 'dropout' rng;
nothing but a 'params' collection (teachers are vmapped over stacked params);
fields filled in from the dataset's `info`; and, for the Transformer, causality
and an output layer reachable for sampled distillation targets.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codistill_jax import models
from codistill_jax.errors import ConfigError

B = 3  # batch size of every test input

# case -> (model module, config.model kwargs, dataset info, input maker).
# Every case uses dropout so the train/eval tests mean something; `info` holds
# an entry that is no model field, as real dataset infos do.
CASES = {
    "ctr_mlp": (
        "ctr_mlp",
        dict(embed_dim=4, hidden_sizes=(8, 8), dropout_rate=0.5),
        dict(cardinalities=(5, 11, 3), num_dense=2, num_train=100),
        lambda r: {
            "cat": jnp.asarray(
                r.integers(0, np.array([5, 11, 3]), size=(B, 3)), jnp.int32),
            "dense": jnp.asarray(r.normal(size=(B, 2)), jnp.float32),
        },
    ),
    "cnn": (
        "cnn",
        dict(features=(4, 8), hidden=16, dropout_rate=0.5),
        dict(num_classes=10, num_train=100),
        lambda r: jnp.asarray(r.normal(size=(B, 28, 28, 1)), jnp.float32),
    ),
    "resnet": (
        "resnet",
        dict(stage_sizes=(1, 1), width=8, dropout_rate=0.5),
        dict(num_classes=10, num_train=100),
        lambda r: jnp.asarray(r.normal(size=(B, 28, 28, 1)), jnp.float32),
    ),
    "transformer": (
        "transformer",
        dict(num_layers=2, num_heads=2, emb_dim=16, mlp_dim=32,
             dropout_rate=0.5),
        dict(vocab_size=37, max_len=8, num_train=100),
        lambda r: jnp.asarray(r.integers(0, 37, size=(B, 8)), jnp.int32),
    ),
}


def _expected_shape(case):
  _, _, info, _ = CASES[case]
  if "cardinalities" in info:
    return (B,)
  if "vocab_size" in info:
    return (B, info["max_len"], info["vocab_size"])
  return (B, info["num_classes"])


@functools.cache
def _setup(case):
  """Returns (model, variables, x) of a case; cached across tests."""
  name, kwargs, info, make_x = CASES[case]
  model = models.build(name, kwargs, info)
  x = make_x(np.random.default_rng(0))
  return model, _init(model, 0, x), x


def _key(seed):
  # 'rbg' keys: XLA compiles the default threefry generator slowly on CPU
  # (seconds per init), and the models must not care which generator it is.
  return jax.random.key(seed, impl="rbg")


def _init(model, seed, x):
  return _jit_init(model, _key(seed), x)


@functools.partial(jax.jit, static_argnums=0)
def _jit_init(model, key, x):
  return model.init(key, x, train=False)


# Jitted: op-by-op application compiles every primitive separately, which costs
# more than the whole test file can afford on two cores.
@functools.partial(jax.jit, static_argnames=("model", "train", "method"))
def _apply(model, variables, x, train, seed=None, method=None):
  """model.apply; seed=None runs without any rng, as teachers do."""
  rngs = {} if seed is None else {"dropout": _key(seed)}
  return model.apply(variables, x, train=train, rngs=rngs,
                     method=None if method is None else getattr(model, method))


@pytest.mark.parametrize("case", CASES)
def test_build_fills_fields_from_info(case):
  name, kwargs, info, _ = CASES[case]
  model = models.build(name, kwargs, info)
  for k, v in info.items():
    if k != "num_train":
      assert getattr(model, k) == v, k
  # config.model wins over the data's info for a field set in both.
  key = next(k for k in info if k != "num_train")
  other = 999 if isinstance(info[key], int) else tuple(info[key])[:-1]
  assert getattr(models.build(name, {**kwargs, key: other}, info), key) == other


@pytest.mark.parametrize("case", CASES)
def test_logits_shape_dtype(case):
  model, variables, x = _setup(case)
  for train in (False, True):
    logits = _apply(model, variables, x, train, seed=0)
    assert logits.shape == _expected_shape(case)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
  # Logits depend on the input, not only on biases.
  assert np.ptp(np.asarray(logits), axis=0).max() > 1e-4


@pytest.mark.parametrize("case", CASES)
def test_only_float32_params(case):
  _, variables, _ = _setup(case)
  assert set(variables) == {"params"}
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("case", CASES)
def test_eval_deterministic_train_uses_dropout_rng(case):
  model, variables, x = _setup(case)
  eval_a = _apply(model, variables, x, train=False, seed=1)
  eval_b = _apply(model, variables, x, train=False, seed=2)
  np.testing.assert_array_equal(eval_a, eval_b)
  # Eval needs no rng at all: teachers are applied without one.
  np.testing.assert_array_equal(
      eval_a, _apply(model, variables, x, train=False))
  train_a = _apply(model, variables, x, train=True, seed=1)
  train_b = _apply(model, variables, x, train=True, seed=2)
  assert not np.allclose(train_a, train_b)
  assert not np.allclose(train_a, eval_a)
  # Same rng, same dropout mask: a resumed run must replay exactly.
  np.testing.assert_array_equal(
      train_a, _apply(model, variables, x, train=True, seed=1))


@pytest.mark.parametrize("case", CASES)
def test_jit_grad_reaches_every_param(case):
  model, variables, x = _setup(case)
  w = jnp.asarray(np.random.default_rng(1).normal(size=_expected_shape(case)),
                  jnp.float32)

  @jax.jit
  def loss_fn(variables, rng):
    logits = model.apply(variables, x, train=True, rngs={"dropout": rng})
    return jnp.sum(logits * w)

  grads = jax.grad(loss_fn)(variables, _key(3))
  flat = jax.tree_util.tree_leaves_with_path(grads)
  for path, g in flat:
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    # A parameter with an all-zero gradient is dead (wired to nothing).
    assert np.any(g != 0), jax.tree_util.keystr(path)


@pytest.mark.parametrize("case", CASES)
def test_vmap_over_stacked_params(case):
  model, variables, x = _setup(case)
  other = _init(model, 1, x)
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), variables, other)
  batched = jax.jit(jax.vmap(lambda v: model.apply(v, x, train=False)))(stacked)
  one = _apply(model, variables, x, train=False)
  two = _apply(model, other, x, train=False)
  np.testing.assert_allclose(batched[0], one, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(batched[1], two, rtol=1e-5, atol=1e-5)
  assert not np.allclose(one, two)


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_compute(case):
  model, variables, x = _setup(case)
  model16 = models.build(CASES[case][0], {**CASES[case][1],
                                          "dtype": jnp.bfloat16},
                         CASES[case][2])
  # Params of a bfloat16 model are still float32 and interchangeable.
  init16 = jax.eval_shape(
      functools.partial(model16.init, train=False), _key(0), x)
  assert jax.tree.structure(init16) == jax.tree.structure(variables)
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(init16)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  logits16 = _apply(model16, variables, x, train=False)
  logits32 = _apply(model, variables, x, train=False)
  assert logits16.dtype == jnp.float32
  assert logits16.shape == logits32.shape
  # Close to float32, but not equal: the dtype is really used.
  scale = float(np.abs(logits32).max())
  np.testing.assert_allclose(logits16, logits32, atol=0.1 * scale)
  assert not np.array_equal(logits16, logits32)


@pytest.mark.parametrize("case", ["cnn", "resnet"])
def test_images_without_channel_axis_are_grey(case):
  model, variables, x = _setup(case)
  np.testing.assert_array_equal(
      _apply(model, variables, x[..., 0], train=False),
      _apply(model, variables, x, train=False))


def test_ctr_one_table_per_column():
  _, variables, _ = _setup("ctr_mlp")
  _, kwargs, info, _ = CASES["ctr_mlp"]
  params = variables["params"]
  tables = sorted(k for k in params if k.startswith("embed_"))
  assert len(tables) == len(info["cardinalities"])
  for j, n in enumerate(info["cardinalities"]):
    assert params[f"embed_{j}"]["embedding"].shape == (n, kwargs["embed_dim"])


def test_ctr_rejects_wrong_number_of_columns():
  model, variables, x = _setup("ctr_mlp")
  bad = {"cat": x["cat"][:, :2], "dense": x["dense"]}
  with pytest.raises(ConfigError, match="cardinalities"):
    model.apply(variables, bad, train=False)


def test_resnet_imagenet_stem():
  model = models.build("resnet", {"stage_sizes": (1,), "width": 8,
                                  "stem": "imagenet"}, {"num_classes": 7})
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, 32, 32, 3)),
                  jnp.float32)
  variables = _init(model, 0, x)
  assert variables["params"]["stem"]["kernel"].shape == (7, 7, 3, 8)
  logits = _apply(model, variables, x, train=False)
  assert logits.shape == (B, 7) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_resnet_rejects_unknown_stem():
  model = models.build("resnet", {"stem": "vit", "width": 8},
                       {"num_classes": 2})
  with pytest.raises(ConfigError, match="stem"):
    model.init(_key(0), jnp.zeros((1, 8, 8, 1)), train=False)


def test_transformer_is_causal():
  model, variables, x = _setup("transformer")
  t = 3
  changed = x.at[:, t + 1:].set((x[:, t + 1:] + 1) % 37)
  before = _apply(model, variables, x, train=False)
  after = _apply(model, variables, changed, train=False)
  np.testing.assert_allclose(after[:, :t + 1], before[:, :t + 1],
                             rtol=1e-6, atol=1e-6)
  # ...while later positions do see the change (else the test proves nothing).
  for s in range(t + 1, x.shape[1]):
    assert not np.allclose(after[:, s], before[:, s]), s


def test_transformer_shorter_sequences_and_too_long():
  model, variables, x = _setup("transformer")
  # A prefix gives the same logits as the full sequence on that prefix.
  np.testing.assert_allclose(
      _apply(model, variables, x[:, :5], train=False),
      _apply(model, variables, x, train=False)[:, :5], rtol=1e-5, atol=1e-5)
  too_long = jnp.concatenate([x, x], axis=1)
  with pytest.raises(ConfigError, match="max_len"):
    model.apply(variables, too_long, train=False)


@pytest.mark.parametrize("train", [False, True])
def test_transformer_hidden_and_output_embedding_give_logits(train):
  model, variables, x = _setup("transformer")
  hidden = _apply(model, variables, x, train, seed=0, method="hidden")
  assert hidden.shape == x.shape + (model.emb_dim,)
  assert hidden.dtype == jnp.float32
  kernel, bias = model.output_embedding(variables)
  assert kernel.shape == (model.emb_dim, model.vocab_size)
  assert bias.shape == (model.vocab_size,)
  np.testing.assert_allclose(
      hidden @ kernel + bias[None, None],
      _apply(model, variables, x, train, seed=0),
      rtol=1e-5, atol=1e-5)
  # The same through the module-level function, the class, and on the
  # 'params' entry alone (what a train state usually stores).
  module = models.get_module("transformer")
  for k, b in (module.output_embedding(variables),
               module.Model.output_embedding(variables["params"])):
    np.testing.assert_array_equal(k, kernel)
    np.testing.assert_array_equal(b, bias)


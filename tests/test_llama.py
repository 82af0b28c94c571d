"""Tests of the Llama-style LM: numerics against an independent reference,
causality, GQA, RoPE, dtypes, remat, scanned layers, config errors and the
model protocol.

Every model is tiny (vocab 64, width 32, 2 layers, length 8) and every compiled
function is shared between tests where it can be: on two CPU cores, XLA
compiles cost more than the models.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from codistill_jax import models
from codistill_jax.errors import ConfigError
from codistill_jax.models import llama

B, L, V = 2, 8, 64
BASE = dict(vocab_size=V, max_len=L, num_layers=2, num_heads=4, emb_dim=32,
            mlp_dim=64, dtype="float32")
X = jnp.asarray(np.random.default_rng(0).integers(0, V, size=(B, L)),
                jnp.int32)


def _model(**kw):
  return llama.Model(**{**BASE, **kw})


def _key(seed):
  # 'rbg' keys: XLA compiles the default threefry generator slowly on CPU.
  return jax.random.key(seed, impl="rbg")


def _flat(tree):
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _shapes(model):
  return jax.eval_shape(lambda k: model.init(k, X, train=False), _key(0))


def _random_params(model, seed=0):
  """float32 params of `model`'s shapes, from numpy: no init to compile.

  Norm scales near (not at) 1 so that a norm ignoring its scale shows.
  """
  shapes = _shapes(model)
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in _flat(shapes).items():
    if path.endswith("/scale"):
      value = 1.0 + 0.2 * rng.normal(size=leaf.shape)
    else:
      value = 0.2 * rng.normal(size=leaf.shape)
    flat[tuple(path.split("/"))] = jnp.asarray(value, jnp.float32)
  return traverse_util.unflatten_dict(flat)


# Jitted: op-by-op application compiles every primitive separately.
@functools.partial(jax.jit, static_argnames=("model", "train", "method"))
def _apply(model, variables, x, train=False, seed=None, method=None):
  rngs = {} if seed is None else {"dropout": _key(seed)}
  return model.apply(variables, x, train=train, rngs=rngs,
                     method=None if method is None else getattr(model, method))


@functools.partial(jax.jit, static_argnames=("model",))
def _loss_and_grads(model, variables, x):
  def loss_fn(v):
    logits = model.apply(v, x, train=True, rngs={"dropout": _key(3)})
    return -jnp.mean(jnp.take_along_axis(
        jax.nn.log_softmax(logits), x[..., None], -1))
  return jax.value_and_grad(loss_fn)(variables)


def _reference_logits(variables, x, num_heads, num_kv_heads, theta=1e4,
                      eps=1e-6):
  """The whole model in float64 numpy, written from the Llama equations.

  RoPE as complex rotation of (first half + i * second half) of each head;
  GQA by repeating each kv head for its group of consecutive query heads; the
  causal mask and softmax spelled out.
  """
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  x = np.asarray(x)
  length = x.shape[1]

  def norm(v, scale):
    return v / np.sqrt(np.mean(v**2, -1, keepdims=True) + eps) * scale

  def rotate(v):
    hd = v.shape[-1]
    z = v[..., :hd // 2] + 1j * v[..., hd // 2:]
    angle = np.arange(length)[:, None] * theta ** (
        -2.0 * np.arange(hd // 2)[None, :] / hd)
    z = z * np.exp(1j * angle)[None, :, None, :]
    return np.concatenate([z.real, z.imag], -1)

  h = p["embed"]["embedding"][x]
  causal = np.tril(np.ones((length, length), bool))
  for i in range(sum(k.startswith("layers_") for k in p)):
    lp = p[f"layers_{i}"]
    a, m = lp["attn"], lp["mlp"]
    y = norm(h, lp["attn_norm"]["scale"])
    q = rotate(np.einsum("bld,dnh->blnh", y, a["query"]["kernel"]))
    k = rotate(np.einsum("bld,dnh->blnh", y, a["key"]["kernel"]))
    v = np.einsum("bld,dnh->blnh", y, a["value"]["kernel"])
    group = num_heads // num_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(causal, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bnts,bsnh->btnh", w, v)
    h = h + np.einsum("btnh,nhd->btd", o, a["out"]["kernel"])
    y = norm(h, lp["mlp_norm"]["scale"])
    gate = y @ m["gate"]["kernel"]
    h = h + (gate / (1 + np.exp(-gate)) * (y @ m["up"]["kernel"])
             ) @ m["down"]["kernel"]
  return norm(h, p["final_norm"]["scale"]) @ p["head"]["kernel"]


# ----------------------------------------------------------------------------
# Numerics.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_matches_independent_reference(num_kv_heads):
  # With kv_heads=2 of 4 query heads, the head -> kv-head mapping matters
  # (n // 2, not n % 2).
  model = _model(num_kv_heads=num_kv_heads)
  variables = _random_params(model)
  np.testing.assert_allclose(
      _apply(model, variables, X),
      _reference_logits(variables, X, 4, num_kv_heads or 4),
      rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_float32_params_and_logits():
  # The default dtype is 'bfloat16', given as a name.
  model = llama.Model(**{k: v for k, v in BASE.items() if k != "dtype"})
  assert model.dtype == "bfloat16"
  variables = jax.jit(model.init, static_argnames="train")(
      _key(0), X, train=False)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  logits = _apply(model, variables, X)
  assert logits.shape == (B, L, V) and logits.dtype == jnp.float32
  exact = _apply(_model(), variables, X)
  err = np.max(np.abs(logits - exact))
  assert 0 < err < 0.05 * np.max(np.abs(exact)), err
  # param_dtype is honoured too, here given as a jnp dtype.
  shapes = _shapes(_model(param_dtype=jnp.bfloat16))
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(shapes))


def test_causal():
  model = _model()
  variables = _random_params(model)
  t = 4
  changed = X.at[:, t].set((X[:, t] + 1) % V)
  before, after = _apply(model, variables, X), _apply(model, variables, changed)
  np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
  assert np.min(np.max(np.abs(after[:, t:] - before[:, t:]), -1)) > 1e-3


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
          for _ in range(2))

  @jax.jit
  def scores(m, n):  # q at position m against k at position n, [len(m)].
    rq = jax.vmap(lambda p: llama.rope(q, p[None], 1e4))(m)
    rk = jax.vmap(lambda p: llama.rope(k, p[None], 1e4))(n)
    return jnp.sum(rq * rk, axis=(1, 2, 3, 4))

  m, n = jnp.array([3, 5, 7, 7]), jnp.array([1, 2, 0, 6])
  base = scores(m, n)
  for shift in (1, 17, 1000):
    np.testing.assert_allclose(scores(m + shift, n + shift), base, rtol=1e-4,
                               atol=1e-4)
  # ... and they do depend on it, and position 0 is the identity.
  assert np.min(np.abs(np.diff(base))) > 1e-3
  np.testing.assert_allclose(scores(jnp.zeros(1, jnp.int32),
                                    jnp.zeros(1, jnp.int32)),
                             [jnp.sum(q * k)], rtol=1e-6)


# ----------------------------------------------------------------------------
# The output layer for sampled targets.
# ----------------------------------------------------------------------------
def test_hidden_and_output_embedding_give_logits_also_stacked():
  model = _model()
  stacked = [_random_params(model, seed) for seed in (0, 1)]
  hidden = [_apply(model, v, X, method="hidden") for v in stacked]
  assert hidden[0].shape == (B, L, 32) and hidden[0].dtype == jnp.float32
  kernel, bias = model.output_embedding(stacked[0])
  assert kernel.shape == (32, V) and bias.shape == (V,)
  assert bias.dtype == jnp.float32
  np.testing.assert_allclose(hidden[0] @ kernel + bias[None, None],
                             _apply(model, stacked[0], X), rtol=1e-6,
                             atol=1e-6)
  # On params stacked over a leading teacher axis, as step.py uses it; on the
  # 'params' entry alone too.
  both = jax.tree.map(lambda *a: jnp.stack(a), *stacked)
  kernel, bias = llama.Model.output_embedding(both["params"])
  assert kernel.shape == (2, 32, V) and bias.shape == (2, V)
  logits = jnp.einsum("nbld,ndv->nblv", jnp.stack(hidden), kernel) + bias[
      :, None, None]
  for i, v in enumerate(stacked):
    np.testing.assert_allclose(logits[i], _apply(model, v, X), rtol=1e-5,
                               atol=1e-5)


# ----------------------------------------------------------------------------
# GQA, dropout, remat and scanned layers.
# ----------------------------------------------------------------------------
def _num_params(model):
  shapes = _shapes(model)
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))


def test_multi_query_attention_has_fewer_params():
  shapes = _flat(_shapes(_model(num_kv_heads=1)))
  assert shapes["params/layers_0/attn/key/kernel"].shape == (32, 1, 8)
  assert shapes["params/layers_0/attn/query/kernel"].shape == (32, 4, 8)
  # Each layer drops 2 kv projections of 3 heads x 8 x 32.
  assert _num_params(_model()) - _num_params(_model(num_kv_heads=1)) == (
      2 * 2 * 3 * 8 * 32)


def test_dropout_only_in_training():
  # Under remat: `train` must stay static and the dropout rng reach the block.
  model = _model(dropout_rate=0.5, remat="full")
  variables = _random_params(model)
  evals = [_apply(model, variables, X, seed=s) for s in (0, 1)]
  np.testing.assert_array_equal(evals[0], evals[1])
  np.testing.assert_array_equal(evals[0], _apply(model, variables, X))
  train = [_apply(model, variables, X, train=True, seed=s) for s in (0, 0, 1)]
  np.testing.assert_array_equal(train[0], train[1])
  assert np.max(np.abs(train[0] - train[2])) > 1e-3
  assert np.max(np.abs(train[0] - evals[0])) > 1e-3


def _remat_policies(model, variables):
  """The policy of each rematerialised call in the training forward pass."""

  def walk(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name in ("remat2", "checkpoint"):
        yield e.params["policy"]
      for v in e.params.values():  # Into scan bodies and the like.
        if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns"):
          yield from walk(getattr(v, "jaxpr", v))

  return list(walk(jax.make_jaxpr(lambda v: model.apply(
      v, X, train=True, rngs={"dropout": _key(3)}))(variables).jaxpr))


def _stack_layers(variables):
  """Unscanned params -> the scanned layout (blocks stacked on axis 0)."""
  p = dict(variables["params"])
  p["layers"] = jax.tree.map(lambda *a: jnp.stack(a),
                             p.pop("layers_0"), p.pop("layers_1"))
  return {"params": p}


# 'dots' with scanned layers: one test of the combination large models use.
@pytest.mark.parametrize("remat, scan", [("full", False), ("dots", True)])
def test_remat_same_loss_and_grads(remat, scan):
  ref = _model()
  model = _model(remat=remat, scan_layers=scan)
  variables = _random_params(ref)
  loss, grads = _loss_and_grads(
      model, _stack_layers(variables) if scan else variables, X)
  ref_loss, ref_grads = _loss_and_grads(ref, variables, X)
  if scan:
    ref_grads = _stack_layers(ref_grads)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                 atol=1e-6), grads, ref_grads)
  # And remat is really there, once per (traced) layer, with its policy.
  policy = (None if remat == "full" else
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  assert _remat_policies(model, variables if not scan else
                         _stack_layers(variables)) == [policy] * (
                             1 if scan else 2)
  assert not _remat_policies(ref, variables)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [2, 4])
def test_chunked_attention_equals_whole(chunk):
  """Query blocks give the same causal attention and the same gradients
  (GQA: 4 query heads on 2 kv heads)."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(B, L, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(B, L, 2, 8)), jnp.float32)
          for _ in range(2))
  whole = lambda q, k, v: jax.nn.dot_product_attention(q, k, v,
                                                       is_causal=True)
  part = lambda q, k, v: llama.chunked_attention(q, k, v, chunk)
  np.testing.assert_allclose(part(q, k, v), whole(q, k, v), rtol=1e-5,
                             atol=1e-6)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                 atol=1e-6),
               jax.grad(loss(part), argnums=(0, 1, 2))(q, k, v),
               jax.grad(loss(whole), argnums=(0, 1, 2))(q, k, v))
  # The model with it: same loss and gradients as without.
  model, ref = _model(attention_chunk=chunk, num_kv_heads=2), _model(
      num_kv_heads=2)
  variables = _random_params(ref)
  got, want = (_loss_and_grads(m, variables, X) for m in (model, ref))
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                 atol=1e-6), got, want)


def test_scan_layers_equals_unrolled_with_stacked_params():
  model, scanned = _model(), _model(scan_layers=True)
  variables = jax.jit(scanned.init, static_argnames="train")(
      _key(0), X, train=False)
  kernel = variables["params"]["layers"]["attn"]["query"]["kernel"]
  assert kernel.shape == (2, 32, 4, 8)
  assert np.max(np.abs(kernel[0] - kernel[1])) > 0.1  # Each its own init.
  p = dict(variables["params"])
  layers = p.pop("layers")
  for i in range(2):
    p[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], layers)
  assert jax.tree.map(jnp.shape, {"params": p}) == jax.tree.map(
      jnp.shape, _shapes(model))
  np.testing.assert_allclose(_apply(scanned, variables, X),
                             _apply(model, {"params": p}, X), rtol=1e-5,
                             atol=1e-5)


def test_sharding_axes_cover_every_param_once():
  for model in (_model(num_kv_heads=2), _model(scan_layers=True)):
    shapes = _flat(_shapes(model))
    for path, leaf in shapes.items():
      for prefix in ("", "opt_state/0/mu/"):
        matches = [a for r, a in llama.SHARDING_AXES
                   if re.fullmatch(r, prefix + path)]
        assert len(matches) == 1, (path, matches)
        axes = matches[0]
        assert len(axes) == leaf.ndim, (path, axes)
        assert (axes[0] == "layers") == ("layers/" in path), (path, axes)
  heads = dict(llama.SHARDING_AXES)[r"(?:.*/)?layers_\d+/attn/key/kernel"]
  assert heads == ("embed", "kv_heads", "head_dim")


def test_flops_per_token():
  model = _model(num_kv_heads=2)
  shapes = _flat(_shapes(model))
  matmul = sum(int(np.prod(a.shape)) for p, a in shapes.items()
               if p.endswith("/kernel"))
  assert model.flops_per_token(L) == 2 * matmul + 2 * 2 * 2 * L * 32
  assert model.flops_per_token(2 * L) > model.flops_per_token(L)


# ----------------------------------------------------------------------------
# Config errors and the model protocol.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("kw, field", [
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(emb_dim=30), "emb_dim"),
    (dict(head_dim=7), "head_dim"),
    (dict(dtype="bfloat17"), "dtype"),
    (dict(param_dtype="int8"), "param_dtype"),
    (dict(remat="some"), "remat"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(num_layers=0), "num_layers"),
    (dict(mlp_dim=-1), "mlp_dim"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(attention_chunk=-1), "attention_chunk"),
    (dict(attention_chunk=3), "attention_chunk"),  # Does not divide L = 8.
])
def test_config_errors(kw, field):
  with pytest.raises(ConfigError, match=rf"config\.model\.{field}"):
    _shapes(_model(**kw))


def test_too_long_sequences():
  model = _model(max_len=L - 1)
  with pytest.raises(ConfigError, match=r"config\.model\.max_len"):
    _shapes(model)


def test_build_through_the_model_protocol():
  kwargs = {k: v for k, v in BASE.items() if k != "vocab_size"}
  model = models.build("llama", kwargs, {"vocab_size": V, "num_train": 100})
  assert model.vocab_size == V and model.max_len == L
  logits = jax.eval_shape(
      lambda k: model.apply(model.init(k, X, train=False), X, train=False),
      _key(0))
  assert logits.shape == (B, L, V) and logits.dtype == jnp.float32
  with pytest.raises(ConfigError, match="unknown field"):
    models.build("llama", {**kwargs, "n_heads": 4}, {"vocab_size": V})
  # The ranges checked at config load name real fields.
  fields = {f.name for f in dataclasses.fields(llama.Model)}
  assert set(llama.RANGES) <= fields, set(llama.RANGES) - fields

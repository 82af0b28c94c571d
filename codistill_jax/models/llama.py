"""Llama-style decoder-only language model, built to be sharded and scaled.

The modern counterpart of `transformer.py`: RMSNorm (no bias), rotary position
embeddings, causal self-attention with optional grouped-query attention (GQA),
a SwiGLU MLP, no biases anywhere, and an untied output layer `head` exposed
through `hidden` and `output_embedding` for sampled distillation targets
(`hidden(x) @ kernel + bias == __call__(x)`; the bias is all zeros).

Parameter paths (unscanned; `i` is the layer index) and their logical axes:

  params/embed/embedding              [vocab, embed]
  params/layers_i/attn_norm/scale     [embed]
  params/layers_i/attn/query/kernel   [embed, heads, head_dim]
  params/layers_i/attn/key/kernel     [embed, kv_heads, head_dim]
  params/layers_i/attn/value/kernel   [embed, kv_heads, head_dim]
  params/layers_i/attn/out/kernel     [heads, head_dim, embed]
  params/layers_i/mlp_norm/scale      [embed]
  params/layers_i/mlp/gate/kernel     [embed, mlp]
  params/layers_i/mlp/up/kernel       [embed, mlp]
  params/layers_i/mlp/down/kernel     [mlp, embed]
  params/final_norm/scale             [embed]
  params/head/kernel                  [embed, vocab]

With `scan_layers=True` the blocks are one `params/layers/...` subtree whose
every leaf has a leading `layers` axis of size num_layers. `SHARDING_AXES`
lists these as (regex, logical axis names); a mesh module maps the names to
mesh axes (e.g. heads/kv_heads/mlp -> 'model', embed -> 'data' for FSDP). The
model itself names no device axis.

Numerics: parameters are `param_dtype` and matmuls run in `dtype`; RMSNorm
statistics, RoPE and the attention softmax are float32; the final norm and the
output layer compute in float32 and the logits are float32, for the reasons in
`transformer.py` (small tail probabilities of distillation targets, exact
sampled-softmax reconstruction).

Input: int tokens [b, L] with L <= max_len. Returns float32 logits
[b, L, vocab_size]; position t sees tokens 0..t only.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from codistill_jax import models as models_lib
from codistill_jax.errors import ConfigError

REMAT = ("none", "full", "dots")
ATTENTION_IMPLS = (None, "xla", "cudnn")

# Logical axes of every parameter of one block, by path inside the block.
_BLOCK_AXES = (
    ("attn_norm/scale", ("embed",)),
    ("attn/query/kernel", ("embed", "heads", "head_dim")),
    ("attn/key/kernel", ("embed", "kv_heads", "head_dim")),
    ("attn/value/kernel", ("embed", "kv_heads", "head_dim")),
    ("attn/out/kernel", ("heads", "head_dim", "embed")),
    ("mlp_norm/scale", ("embed",)),
    ("mlp/gate/kernel", ("embed", "mlp")),
    ("mlp/up/kernel", ("embed", "mlp")),
    ("mlp/down/kernel", ("mlp", "embed")),
)
# Any prefix, so optimizer moments (opt_state/.../mu/params/...) and a state's
# 'params/params/...' match the rule of their parameter.
_ANY = r"(?:.*/)?"

# (regex for re.fullmatch over the '/'-joined parameter path, logical axis name
# of each dimension); first match wins, as in `mesh.spec_for`.
SHARDING_AXES = (
    (_ANY + r"embed/embedding", ("vocab", "embed")),
    *((_ANY + r"layers_\d+/" + p, axes) for p, axes in _BLOCK_AXES),
    *((_ANY + r"layers/" + p, ("layers",) + axes) for p, axes in _BLOCK_AXES),
    (_ANY + r"final_norm/scale", ("embed",)),
    (_ANY + r"head/kernel", ("embed", "vocab")),
)


def output_embedding(params):
  """Returns (kernel [emb_dim, vocab], zero bias [vocab]) of the output layer.

  Works on parameters stacked over leading axes (teachers, [n, emb_dim, V]
  gives a bias [n, V]).

  Args:
    params: the variables returned by `Model.init` (`{'params': {...}}`), or
      their 'params' entry.
  """
  p = params["params"] if "params" in params else params
  kernel = p["head"]["kernel"]
  return kernel, jnp.zeros(kernel.shape[:-2] + kernel.shape[-1:], jnp.float32)


def rope(x, positions, theta: float):
  """Rotary embedding of x [b, L, heads, head_dim] at int positions [L].

  Rotates each pair (x[..., j], x[..., j + head_dim/2]) by the angle
  position * theta^(-2j/head_dim): the half-split layout of Hugging Face's
  Llama (Meta's code pairs adjacent entries instead; the two differ by a fixed
  permutation of the q/k kernels' head_dim columns). In float32: bfloat16
  holds integers exactly only up to 256, so its angles drift by radians.
  """
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = (positions.astype(jnp.float32)[:, None] * freq[None, :])
  sin, cos = jnp.sin(angle)[None, :, None, :], jnp.cos(angle)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def chunked_attention(q, k, v, chunk: int, implementation=None):
  """Causal attention in query blocks of `chunk` positions: a block's scores
  [b, heads, chunk, L] at a time instead of [b, heads, L, L].

  Each block is its own `jax.checkpoint`, so the backward pass recomputes its
  scores rather than keeping every block's: the memory of the scores and
  their softmax falls by L / chunk, the FLOPs stay those of the full square
  (and one more forward of the scores in the backward). The loop is unrolled
  (L / chunk blocks), so the compiler's cost model counts every block.
  q [b, L, heads, d], k and v [b, L, kv_heads, d]; L a multiple of chunk.
  """
  length = q.shape[1]
  positions = jnp.arange(length)

  @jax.checkpoint
  def block(q_block, k, v, start):
    mask = (start + jnp.arange(q_block.shape[1]))[:, None] >= positions[None]
    return jax.nn.dot_product_attention(q_block, k, v, mask=mask[None, None],
                                        implementation=implementation)

  return jnp.concatenate(
      [block(q[:, i:i + chunk], k, v, i) for i in range(0, length, chunk)],
      axis=1)


def _dtype(field: str, value):
  """A floating jnp dtype from a name ('bfloat16') or a dtype."""
  try:
    dt = None if value is None else jnp.dtype(value)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise ConfigError(f"config.model.{field}={value!r} is not a floating "
                      "dtype; use 'float32' or 'bfloat16'")
  return dt


class _RMSNorm(nn.Module):
  """x / rms(x) * scale, statistics in float32, output in `dtype`."""

  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],),
                       self.param_dtype)
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
            ).astype(self.dtype)


class _Dims(NamedTuple):
  """A block's resolved hyperparameters (hashable, as module fields must be)."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float
  norm_eps: float
  dropout_rate: float
  attention_impl: str | None
  dtype: Any
  param_dtype: Any
  attention_chunk: int = 0


def _dense(dims: _Dims, features, name: str, axis=-1):
  return nn.DenseGeneral(features, axis=axis, use_bias=False, dtype=dims.dtype,
                         param_dtype=dims.param_dtype, name=name)


class _Attention(nn.Module):
  """Causal self-attention with RoPE and grouped-query attention."""

  dims: _Dims

  @nn.compact
  def __call__(self, x):
    c = self.dims
    positions = jnp.arange(x.shape[1])
    q = _dense(c, (c.num_heads, c.head_dim), "query")(x)
    k = _dense(c, (c.num_kv_heads, c.head_dim), "key")(x)
    v = _dense(c, (c.num_kv_heads, c.head_dim), "value")(x)
    q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
    # GQA natively: query head n uses kv head n // (num_heads / num_kv_heads).
    # Scores and softmax are float32 inside whatever the dtype.
    if c.attention_chunk and c.attention_chunk < x.shape[1]:
      y = chunked_attention(q, k, v, c.attention_chunk, c.attention_impl)
    else:
      y = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                       implementation=c.attention_impl)
    return _dense(c, x.shape[-1], "out", axis=(-2, -1))(y)


class _Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  dims: _Dims

  @nn.compact
  def __call__(self, x):
    c = self.dims
    y = nn.silu(_dense(c, c.mlp_dim, "gate")(x)) * _dense(c, c.mlp_dim, "up")(x)
    return _dense(c, x.shape[-1], "down")(y)


# Logical axes of the activations between blocks; `mesh.ACTIVATION_RULES`
# maps 'batch' to the data axis and leaves the others whole.
ACTIVATION_AXES = ("batch", "length", "embed")


class _Block(nn.Module):
  """Pre-norm block: x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)).

  Returns (x, None), a carry and no output, to be the body of `nn.scan` too.
  """

  dims: _Dims

  @nn.compact
  def __call__(self, x, train: bool):
    c = self.dims
    drop = nn.Dropout(c.dropout_rate, deterministic=not train)
    norm = lambda name: _RMSNorm(c.norm_eps, c.dtype, c.param_dtype, name=name)
    x = x + drop(_Attention(c, name="attn")(norm("attn_norm")(x)))
    x = x + drop(_Mlp(c, name="mlp")(norm("mlp_norm")(x)))
    # The carry between blocks keeps the batch split (a no-op outside
    # `mesh.traced_on`): XLA does not carry the input's sharding into a
    # scanned loop's body by itself and may compute the whole batch there.
    return nn.with_logical_constraint(x, ACTIVATION_AXES), None


# Ranges of the numeric fields a config may set (config_lib.check_ranges, at
# config load); num_kv_heads and head_dim may be None, so the model checks them.
RANGES = {"vocab_size": "> 0", "max_len": "> 0", "num_layers": "> 0",
          "num_heads": "> 0", "emb_dim": "> 0", "mlp_dim": "> 0",
          "rope_theta": "> 0", "norm_eps": "> 0", "dropout_rate": "[0, 1)",
          "num_kv_heads": "> 0", "head_dim": "> 0", "attention_chunk": ">= 0"}
# The values a config may give its string fields (models.check_kwargs, at
# config load; the model checks them again when built, `_dims`).
FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")
CHOICES = {"remat": REMAT, "attention_impl": ATTENTION_IMPLS,
           "dtype": FLOAT_DTYPES, "param_dtype": FLOAT_DTYPES}


class Model(nn.Module):
  """Llama-style decoder-only LM with an untied output layer 'head'.

  Attributes:
    vocab_size: number of token ids (input and output).
    max_len: longest sequence accepted (RoPE needs no table; a longer input is
      a data/config mismatch, so it is an error).
    num_layers: number of blocks.
    num_heads: query heads per block.
    num_kv_heads: key/value heads (GQA); must divide num_heads; None means
      num_heads (plain multi-head attention), 1 is multi-query attention.
    emb_dim: model width.
    mlp_dim: hidden width of each SwiGLU MLP.
    head_dim: width of each head; None means emb_dim // num_heads. Even
      (RoPE rotates pairs).
    rope_theta: RoPE base; larger values suit longer contexts.
    norm_eps: added to the mean square in every RMSNorm.
    dropout_rate: dropout on each residual branch (train only).
    dtype: compute dtype, a name ('bfloat16') or a jnp dtype.
    param_dtype: parameter dtype, likewise.
    attention_impl: None (JAX chooses), 'xla' or 'cudnn' (GPU flash
      attention), passed to `jax.nn.dot_product_attention`.
    attention_chunk: 0 computes attention over the whole sequence at once;
      C > 0 in query blocks of C positions (`chunked_attention`): L / C times
      less memory for the scores, where no flash kernel keeps them off HBM
      (TPU through XLA). Must divide the sequence length if shorter.
    remat: 'none'; 'full' recomputes each block in the backward pass; 'dots'
      keeps the blocks' weight matmul outputs and recomputes the rest,
      including the [L, L] attention scores.
    scan_layers: run the blocks as one `nn.scan` over parameters stacked on a
      leading 'layers' axis: compile time independent of depth.
  """

  vocab_size: int
  max_len: int
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int | None = None
  emb_dim: int = 128
  mlp_dim: int = 512
  head_dim: int | None = None
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  dtype: Any = "bfloat16"
  param_dtype: Any = "float32"
  attention_impl: str | None = None
  attention_chunk: int = 0
  remat: str = "none"
  scan_layers: bool = False

  # A plain function of params, so callers need no module instance to reach
  # the output layer (e.g. when building sampled targets inside a jitted step).
  output_embedding = staticmethod(output_embedding)

  def _dims(self) -> _Dims:
    """The blocks' hyperparameters; raises a ConfigError on a bad field."""
    for field in ("vocab_size", "max_len", "num_layers", "num_heads",
                  "num_kv_heads", "emb_dim", "mlp_dim", "head_dim"):
      value = getattr(self, field)
      if value is None and field in ("num_kv_heads", "head_dim"):
        continue
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"config.model.{field}={value!r} must be a positive "
                          "integer")
    kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads:
      raise ConfigError(
          f"config.model.num_kv_heads={kv_heads} must divide "
          f"config.model.num_heads={self.num_heads}; use a divisor of "
          f"{self.num_heads} (1 for multi-query attention)")
    head_dim = self.head_dim
    if head_dim is None:
      if self.emb_dim % self.num_heads:
        raise ConfigError(
            f"config.model.num_heads={self.num_heads} does not divide "
            f"config.model.emb_dim={self.emb_dim}; use a divisor or set "
            "config.model.head_dim")
      head_dim = self.emb_dim // self.num_heads
    if head_dim % 2:
      raise ConfigError(f"head_dim={head_dim} must be even for RoPE; set an "
                        "even config.model.head_dim (or emb_dim / num_heads)")
    if not self.rope_theta > 0:
      raise ConfigError(f"config.model.rope_theta={self.rope_theta!r} must be "
                        "> 0 (10000.0 is Llama's)")
    if not 0 <= self.dropout_rate < 1:
      raise ConfigError(f"config.model.dropout_rate={self.dropout_rate!r} "
                        "must be in [0, 1)")
    if self.remat not in REMAT:
      raise ConfigError(f"config.model.remat={self.remat!r} is unknown; use "
                        f"one of {REMAT}")
    chunk = self.attention_chunk
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
      raise ConfigError(f"config.model.attention_chunk={chunk!r} must be an "
                        "integer >= 0 (0: the whole sequence at once)")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(
          f"config.model.attention_impl={self.attention_impl!r} is unknown; "
          f"use one of {ATTENTION_IMPLS}")
    return _Dims(self.num_heads, kv_heads, head_dim, self.mlp_dim,
                 self.rope_theta, self.norm_eps, self.dropout_rate,
                 self.attention_impl, _dtype("dtype", self.dtype),
                 _dtype("param_dtype", self.param_dtype), self.attention_chunk)

  def setup(self):
    dims = self._dims()
    self.embed = nn.Embed(self.vocab_size, self.emb_dim, dtype=dims.dtype,
                          param_dtype=dims.param_dtype)
    block = _Block
    if self.remat != "none":
      # `train` (argument 2, counting self) is a Python bool that picks the
      # dropout path, so it must stay static. Inside a scan the loop already
      # keeps XLA from merging the recomputation away: no prevent_cse there.
      block = nn.remat(
          block, static_argnums=(2,), prevent_cse=not self.scan_layers,
          policy=(None if self.remat == "full" else
                  jax.checkpoint_policies.dots_with_no_batch_dims_saveable))
    if self.scan_layers:
      # One traced block for all layers; each layer its own params (stacked on
      # axis 0) and its own dropout mask.
      self.layers = nn.scan(
          block, variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast,), length=self.num_layers)(dims)
    else:
      self.layers = [block(dims) for _ in range(self.num_layers)]
    self.final_norm = _RMSNorm(self.norm_eps, jnp.float32, dims.param_dtype)
    self.head = nn.Dense(self.vocab_size, use_bias=False, dtype=jnp.float32,
                         param_dtype=dims.param_dtype)

  def hidden(self, x, train: bool):
    """Returns the final normalised hidden states, float32 [b, L, emb_dim]."""
    length = x.shape[-1]
    models_lib.check_length("llama", length, self.max_len)
    if 0 < self.attention_chunk < length and length % self.attention_chunk:
      raise ConfigError(
          f"config.model.attention_chunk={self.attention_chunk} does not "
          f"divide the sequence length {length} (config.data.seq_len); use a "
          "divisor of it, or 0")
    h = nn.with_logical_constraint(self.embed(x), ACTIVATION_AXES)
    if self.scan_layers:
      h, _ = self.layers(h, train)
    else:
      for layer in self.layers:
        h, _ = layer(h, train)
    return self.final_norm(h)

  def __call__(self, x, train: bool):
    return self.head(self.hidden(x, train))

  def flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token of a length-`seq_len` sequence.

    2 FLOPs (a multiply-add) per weight of every matmul (q, k, v, out, gate,
    up, down and head; the embedding lookup is free), plus 2 * 2 * seq_len *
    num_heads * head_dim per layer for the scores and the weighted values over
    the full [L, L] square, not halved for causality (PaLM's MFU convention).
    Norms, RoPE and softmax are not counted. Training is about 3x this.
    """
    c = self._dims()
    d, inner = self.emb_dim, c.num_heads * c.head_dim
    per_layer = (2 * d * inner + 2 * d * c.num_kv_heads * c.head_dim +
                 3 * d * c.mlp_dim)
    weights = self.num_layers * per_layer + d * self.vocab_size
    attention = self.num_layers * 2 * 2 * seq_len * inner
    return float(2 * weights + attention)

"""Decoder-only Transformer language model (pre-LayerNorm, causal attention).

GPT-style: token + learned position embeddings, `num_layers` pre-LN blocks of
causal multi-head self-attention and a GELU MLP, a final LayerNorm, then an
untied output layer `head` (kernel [emb_dim, vocab] and bias [vocab]).

The output layer is kept separate (not tied to the input embedding) and exposed
through `hidden` and `output_embedding` so that importance-sampled distillation
(`sampling.py`) can score only a subset of the vocabulary:
`hidden(x) @ kernel + bias` equals `__call__(x)`.

The output layer always computes in float32, whatever `dtype` is: the logits
feed softmax distillation targets whose small tail probabilities bfloat16
rounding would distort, and a float32 head lets the sampled-softmax path
reproduce the full logits from `hidden` and `output_embedding` exactly.

Input: int tokens [b, L] with L <= max_len. Returns float32 logits
[b, L, vocab_size]; position t sees tokens 0..t only.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from codistill_jax import models as models_lib
from codistill_jax.errors import ConfigError


def output_embedding(params):
  """Returns (kernel [emb_dim, vocab], bias [vocab]) of the output layer.

  Args:
    params: the variables returned by `Model.init` (`{'params': {...}}`), or
      their 'params' entry.
  """
  p = params["params"] if "params" in params else params
  return p["head"]["kernel"], p["head"]["bias"]


class _Block(nn.Module):
  """Pre-LN Transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

  num_heads: int
  mlp_dim: int
  dropout_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, x, mask, train: bool):
    y = nn.LayerNorm(dtype=self.dtype, name="ln_attn")(x)
    # Softmax in float32: with bfloat16 attention logits, large scores round
    # coarsely and the weights of long contexts lose their small entries.
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        force_fp32_for_softmax=True, deterministic=not train,
        name="attn")(y, mask=mask)
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
    y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(y))
    y = nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp_out")(y)
    return x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)


# Ranges of the fields a config may set (config_lib.check_ranges).
RANGES = {"vocab_size": "> 0", "max_len": "> 0", "num_layers": "> 0",
          "num_heads": "> 0", "emb_dim": "> 0", "mlp_dim": "> 0",
          "dropout_rate": "[0, 1)"}


class Model(nn.Module):
  """Decoder-only Transformer LM with an untied output layer 'head'.

  Attributes:
    vocab_size: number of token ids (input and output).
    max_len: longest sequence; sets the size of the position table.
    num_layers: number of Transformer blocks.
    num_heads: attention heads per block; must divide emb_dim.
    emb_dim: model width.
    mlp_dim: hidden width of each block's MLP.
    dropout_rate: dropout on embeddings and on each residual branch (train
      only).
    dtype: compute dtype; parameters stay float32; the output layer and the
      logits are float32 (see the module docstring).
  """

  vocab_size: int
  max_len: int
  num_layers: int = 2
  num_heads: int = 4
  emb_dim: int = 128
  mlp_dim: int = 512
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  # A plain function of params, so callers need no module instance to reach
  # the output layer (e.g. when building sampled targets inside a jitted step).
  output_embedding = staticmethod(output_embedding)

  def setup(self):
    if self.emb_dim % self.num_heads:
      raise ConfigError(
          f"transformer num_heads={self.num_heads} must divide "
          f"emb_dim={self.emb_dim}")
    self.embed = nn.Embed(self.vocab_size, self.emb_dim, dtype=self.dtype)
    self.pos_embedding = self.param(
        "pos_embedding", nn.initializers.normal(stddev=0.02),
        (self.max_len, self.emb_dim))
    self.blocks = [
        _Block(self.num_heads, self.mlp_dim, self.dropout_rate, self.dtype)
        for _ in range(self.num_layers)
    ]
    self.final_norm = nn.LayerNorm(dtype=self.dtype)
    self.dropout = nn.Dropout(self.dropout_rate)
    self.head = nn.Dense(self.vocab_size, dtype=jnp.float32)

  def hidden(self, x, train: bool):
    """Returns the final normalised hidden states, float32 [b, L, emb_dim]."""
    length = x.shape[-1]
    models_lib.check_length("transformer", length, self.max_len)
    pos = self.pos_embedding[None, :length].astype(self.dtype)
    h = self.embed(x) + pos
    h = self.dropout(h, deterministic=not train)
    mask = nn.make_causal_mask(x, dtype=jnp.bool_)
    for block in self.blocks:
      h = block(h, mask, train)
    return self.final_norm(h).astype(jnp.float32)

  def __call__(self, x, train: bool):
    return self.head(self.hidden(x, train))

"""A word-level tokenizer for the language-model pipelines.

Text is lower-cased and split into words (runs of letters, digits and '_', so
kernel identifiers like `spin_lock_irqsave` stay whole) and punctuation (a run
of one repeated character is one token, so an RST underline '=====' costs one
token, not sixty). The vocabulary is the most frequent training tokens after
three specials: 0 = padding, 1 = unknown, 2 = end of document. It is word
level on purpose: no extra dependency, a vocabulary of 8k-32k covers ~97% of
kernel-doc tokens, and a large closed vocabulary is exactly the setting of the
importance-sampled distillation work this codebase reproduces.
"""

from __future__ import annotations

import collections
import json
import re
from typing import Iterable, Sequence

import numpy as np

from codistill_jax.data import sources

PAD = 0
UNK = 1
EOD = 2
SPECIALS = ("<pad>", "<unk>", "<eod>")

# A word, or a run of one repeated non-space, non-word character.
_TOKEN_RE = re.compile(r"\w+|([^\w\s])\1*")


def split(text: str) -> list[str]:
  """Lower-cases `text` and cuts it into tokens (strings)."""
  return [m.group(0) for m in _TOKEN_RE.finditer(text.lower())]


class Tokenizer:
  """Maps text to int32 token ids and back."""

  def __init__(self, vocab: Sequence[str]):
    """Builds a tokenizer from its vocabulary.

    Args:
      vocab: id -> token; must start with SPECIALS and have no duplicates.
    """
    if tuple(vocab[:len(SPECIALS)]) != SPECIALS:
      raise ValueError(f"vocab must start with {SPECIALS}")
    self.vocab = tuple(vocab)
    self._ids = {t: i for i, t in enumerate(self.vocab)}
    if len(self._ids) != len(self.vocab):
      raise ValueError("vocab has duplicate tokens")

  @classmethod
  def build(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """The `vocab_size` - 3 most frequent tokens of `texts`, plus specials.

    Ties are broken by the token itself, so the same texts always give the same
    ids. A corpus with fewer distinct tokens gives a smaller vocabulary.

    Args:
      texts: the training texts (never validation or test).
      vocab_size: the largest vocabulary wanted, specials included.

    Returns:
      The tokenizer.
    """
    if vocab_size <= len(SPECIALS):
      raise ValueError(f"vocab_size={vocab_size} leaves no room for words")
    counts = collections.Counter()
    for text in texts:
      counts.update(split(text))
    for special in SPECIALS:  # The specials' strings are not words.
      counts.pop(special, None)
    words = sorted(counts, key=lambda t: (-counts[t], t))
    return cls(SPECIALS + tuple(words[:vocab_size - len(SPECIALS)]))

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text` (int32 [n]); unknown words map to UNK."""
    tokens = split(text)
    get = self._ids.get
    return np.fromiter((get(t, UNK) for t in tokens), np.int32, len(tokens))

  def decode(self, ids: Iterable[int]) -> str:
    """Space-separated tokens; padding is dropped.

    Words were lower-cased and spacing was not kept, so this is the token
    sequence, not the original text: encode(decode(ids)) == ids for ids without
    PAD, UNK or EOD.
    """
    return " ".join(self.vocab[i] for i in np.asarray(ids).reshape(-1).tolist()
                    if i != PAD)

  def save(self, path: str) -> None:
    """Writes the vocabulary as JSON, atomically (a reader never sees half)."""
    with sources.cache_write(path) as tmp, open(tmp, "w",
                                                encoding="utf-8") as f:
      json.dump({"vocab": list(self.vocab)}, f, ensure_ascii=False)

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    with open(path, encoding="utf-8") as f:
      return cls(json.load(f)["vocab"])

"""A SentencePiece subword tokenizer for the text loaders, and sequence packing.

  train:   `train(texts, ...)` fits a SentencePiece model (unigram or BPE,
           byte fallback, so no text is ever <unk>) on the *training*
           documents only and caches it; `cache_key(docs, ...)` names the
           cache entry by the training documents (ids, file sizes and mtimes)
           and every setting, so a second call with the same inputs loads the
           cached file and reads no text.
  encode:  `encode_documents(model, texts)` -> one int32 array per document,
           end-of-document appended (sentencepiece's multi-threaded batch
           encoder).
  pack:    `pack(docs, seq_len)` concatenates documents into one stream (each
           ends with EOD) and cuts it into full windows of seq_len + 1 ids
           that overlap by one id: no padding, every stream id a target once.

Ids are those of `tokenizer.py`: 0 = padding, 1 = unknown, 2 = end of document
(sentencepiece's pad, unk and eos; there is no bos: a document's first token
is predicted from the EOD before it). The model is reproducible: the training
lines are a fixed-seed sample chosen here (sentencepiece's own sampler draws
from a thread-local generator that a seed set in the same process may not
reach), sentencepiece is given all of them in order with shuffling off, and
its thread count is fixed and part of the cache key.

sentencepiece is imported lazily, so the rest of the package works without it
(`pip install sentencepiece==0.2.3`).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import os
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from codistill_jax.data import sources
from codistill_jax.data import tokenizer as tokenizer_lib
from codistill_jax.errors import ConfigError

PAD = tokenizer_lib.PAD
UNK = tokenizer_lib.UNK
EOD = tokenizer_lib.EOD
SPM_VERSION = "0.2.3"
_INSTALL = f"pip install sentencepiece=={SPM_VERSION}"
MODEL_TYPES = ("unigram", "bpe")
# BPE is the default: on the full corpus (36M words, 3M sampled lines, 32k
# pieces, 2 busy cores) it trained in 27 s against unigram's 16 minutes, with
# the same 1.71 tokens per word; a fresh machine (CI) trains it anew.
DEFAULT_MODEL_TYPE = "bpe"
# Bump when what a cached model means changes, so old caches are not reused.
_CACHE_VERSION = 1

# The training settings that are not the caller's business but are part of
# what the model is (and so of its cache key).
DEFAULTS = {
    # Lines sampled from the training texts (sentencepiece's
    # input_sentence_size, but drawn here with a fixed seed). The full corpus
    # has ~4.2M non-blank lines of ~9 words; 3M of them hold ~2.4 GB while
    # BPE trains (4.7 GB for unigram).
    "max_lines": 3_000_000,
    "seed": 0,
    "character_coverage": 0.9999,
    # Longer lines are cut at spaces (sentencepiece would drop them).
    "max_line_bytes": 4096,
    "split_digits": True,
    # Unigram's EM sums each thread's share of the lines; another thread
    # count would give a (slightly) different model.
    "num_threads": 2,
}


def _sentencepiece():
  try:
    import sentencepiece  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError("the subword tokenizer needs sentencepiece: "
                      f"`{_INSTALL}`") from None
  return sentencepiece


def check(vocab_size: int, model_type: str) -> None:
  """Cheap checks of the tokenizer fields (config.data.vocab_size, ...)."""
  if model_type not in MODEL_TYPES:
    raise ConfigError(f"config.data.spm_model_type={model_type!r}: use one of "
                      f"{', '.join(MODEL_TYPES)}")
  if vocab_size <= 3 + 256:
    raise ConfigError(f"config.data.vocab_size={vocab_size}: a byte-fallback "
                      "subword vocabulary needs more than 259 ids (3 specials "
                      "+ 256 bytes); 8k-32k is realistic")


# ----------------------------------------------------------------------------
# Training lines.
# ----------------------------------------------------------------------------
def _cut(line: str, max_bytes: int) -> Iterable[str]:
  """`line` in pieces of at most max_bytes UTF-8 bytes, cut at spaces."""
  if len(line.encode("utf-8")) <= max_bytes:
    yield line
    return
  piece: list[str] = []
  size = 0
  for word in line.split(" "):
    n = len(word.encode("utf-8")) + 1
    if piece and size + n > max_bytes:
      yield " ".join(piece)
      piece, size = [], 0
    if n > max_bytes:  # One enormous 'word' (a base64 blob): drop it.
      continue
    piece.append(word)
    size += n
  if piece:
    yield " ".join(piece)


def _priority(seed: int, index: int) -> int:
  digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little")


def sample_lines(texts: Iterable[str], max_lines: int, seed: int = 0,
                 max_line_bytes: int = 4096) -> tuple[list[str], int]:
  """A uniform, fixed-seed sample of the non-blank lines of `texts`.

  Bottom-k sampling: line i gets a priority hashed from (seed, i); the
  max_lines lowest win. One pass, memory for max_lines lines, and the sample
  depends only on the texts and the seed (not on the Python hash seed, the
  numpy version or the thread count). Lines keep their corpus order.

  Args:
    texts: the training documents' texts, in a fixed order.
    max_lines: the sample size; 0 takes every line.
    seed: which sample.
    max_line_bytes: longer lines are cut at spaces first.

  Returns:
    (lines, number of lines seen).
  """
  heap: list[tuple[int, int, str]] = []   # (-priority, index, line)
  kept: list[str] = []
  index = 0
  for text in texts:
    for raw in text.split("\n"):
      raw = raw.strip()
      if not raw:
        continue
      for line in _cut(raw, max_line_bytes):
        if not max_lines:
          kept.append(line)
        else:
          item = (-_priority(seed, index), index, line)
          if len(heap) < max_lines:
            heapq.heappush(heap, item)
          elif item > heap[0]:
            heapq.heapreplace(heap, item)
        index += 1
  if not max_lines:
    return kept, index
  return [line for _, _, line in sorted(heap, key=lambda x: x[1])], index


# ----------------------------------------------------------------------------
# Training and the cache.
# ----------------------------------------------------------------------------
def _settings(vocab_size: int, model_type: str,
              options: Mapping[str, Any] | None) -> dict[str, Any]:
  unknown = set(options or {}) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"unknown sentencepiece options {sorted(unknown)}; "
                     f"known: {sorted(DEFAULTS)}")
  return {**DEFAULTS, **(options or {}), "vocab_size": int(vocab_size),
          "model_type": model_type}


def cache_key(docs: Iterable[tuple[str, str]], vocab_size: int,
              model_type: str = DEFAULT_MODEL_TYPE,
              options: Mapping[str, Any] | None = None,
              text_version: int | str = 0) -> str:
  """The cache name of the model trained on `docs` with these settings.

  Args:
    docs: the training documents as (doc_id, path) pairs (e.g.
      `corpus.Document`s); their order does not matter.
    vocab_size, model_type, options: as for `train`.
    text_version: names the code that turns files into texts (e.g.
      `corpus.VERSION`): the same files cleaned differently are another
      training set.

  Returns:
    A hex digest of the sorted doc ids, each file's size and mtime, every
    setting, the text version, the sentencepiece version and this module's
    cache version.
  """
  stamps: dict[str, tuple[int, int]] = {}
  ids = []
  for doc_id, path in docs:
    if path not in stamps:
      st = os.stat(path)
      stamps[path] = (st.st_size, st.st_mtime_ns)
    ids.append((doc_id, *stamps[path]))
  blob = json.dumps({"docs": sorted(ids),
                     "settings": _settings(vocab_size, model_type, options),
                     "text_version": text_version,
                     "sentencepiece": SPM_VERSION,
                     "version": _CACHE_VERSION}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:20]


def model_path(cache_dir: str, key: str) -> str:
  return os.path.join(cache_dir, f"spm-{key}.model")


def train(texts: Iterable[str], *, cache_dir: str, key: str,
          vocab_size: int, model_type: str = DEFAULT_MODEL_TYPE,
          options: Mapping[str, Any] | None = None) -> str:
  """Trains a SentencePiece model on `texts`, or finds it in the cache.

  Args:
    texts: the training documents' texts (never validation or test), in a
      fixed order; read lazily, and not at all when the model is cached.
    cache_dir: where models live (created if missing).
    key: `cache_key(train_docs, vocab_size, model_type, options)`.
    vocab_size: pieces, specials and 256 byte pieces included (8k-32k).
    model_type: 'unigram' or 'bpe'.
    options: overrides of `DEFAULTS`.

  Returns:
    The path of the .model file. A JSON file beside it records the settings,
    the line counts and the training time.
  """
  check(vocab_size, model_type)
  path = model_path(cache_dir, key)
  if os.path.exists(path):
    return path
  spm = _sentencepiece()
  if spm.__version__ != SPM_VERSION:
    # Another version may give another model for the same key.
    raise ConfigError(f"sentencepiece {spm.__version__} is installed; the "
                      f"tokenizer cache is keyed to {SPM_VERSION}: "
                      f"`{_INSTALL}`")
  settings = _settings(vocab_size, model_type, options)
  start = time.time()
  lines, seen = sample_lines(texts, settings["max_lines"], settings["seed"],
                             settings["max_line_bytes"])
  if not lines:
    raise ConfigError("the tokenizer's training documents have no text")
  sampled = time.time()
  model = io.BytesIO()
  spm.set_random_generator_seed(settings["seed"])
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model,
      model_type=model_type, vocab_size=vocab_size,
      character_coverage=settings["character_coverage"],
      # The sample above already is the training set: no second sampling or
      # shuffling by sentencepiece.
      input_sentence_size=0, shuffle_input_sentence=False,
      max_sentence_length=settings["max_line_bytes"] + 1,
      num_threads=settings["num_threads"],
      split_digits=settings["split_digits"], byte_fallback=True,
      pad_id=PAD, unk_id=UNK, eos_id=EOD, bos_id=-1,
      pad_piece=tokenizer_lib.SPECIALS[PAD],
      unk_piece=tokenizer_lib.SPECIALS[UNK],
      eos_piece=tokenizer_lib.SPECIALS[EOD],
      # A small vocabulary for a tiny corpus is not an error.
      hard_vocab_limit=False, minloglevel=2)
  os.makedirs(cache_dir, exist_ok=True)
  info = {**settings, "lines_seen": seen, "lines_used": len(lines),
          "sample_s": round(sampled - start, 2),
          "train_s": round(time.time() - sampled, 2),
          "sentencepiece": spm.__version__}
  _write_atomic(path[:-len(".model")] + ".json",
                json.dumps(info, indent=1).encode())
  # The model last: its existence means the entry is complete.
  _write_atomic(path, model.getvalue())
  return path


def _write_atomic(path: str, data: bytes) -> None:
  with sources.cache_write(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


# ----------------------------------------------------------------------------
# Using a model.
# ----------------------------------------------------------------------------
class Tokenizer:
  """A trained SentencePiece model with the project's special ids.

  Newlines and runs of spaces are normalised to single spaces (the model's
  'nmt_nfkc' normaliser): ids carry words and punctuation, not layout.
  """

  def __init__(self, path: str):
    spm = _sentencepiece()
    self.path = path
    self.processor = spm.SentencePieceProcessor(model_file=path)
    if (self.processor.pad_id(), self.processor.unk_id(),
        self.processor.eos_id()) != (PAD, UNK, EOD):
      raise ConfigError(f"{path}: not a model of this project (its pad, unk "
                        f"and eos ids are not {PAD}, {UNK}, {EOD})")

  @property
  def vocab_size(self) -> int:
    return self.processor.get_piece_size()

  def encode(self, text: str) -> np.ndarray:
    """Ids of `text` (int32 [n]), no EOD."""
    return np.asarray(self.processor.encode(text, out_type=int), np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; padding and EOD are dropped."""
    ids = [i for i in np.asarray(ids).reshape(-1).tolist()
           if i not in (PAD, EOD)]
    return self.processor.decode(ids)


def load(path: str) -> Tokenizer:
  return Tokenizer(path)


def encode_documents(model: Tokenizer, texts: Sequence[str],
                     num_threads: int = 0,
                     batch: int = 256) -> list[np.ndarray]:
  """Each text's ids with EOD appended (int32), sentencepiece's batch encoder.

  Args:
    model: a `Tokenizer`.
    texts: documents.
    num_threads: encoder threads; 0 = every core (the ids do not depend on
      it).
    batch: documents per call (bounds the memory of Python lists).

  Returns:
    One int32 array per text, each ending with EOD.
  """
  threads = num_threads or os.cpu_count() or 1
  out = []
  texts = list(texts)
  for start in range(0, len(texts), batch):
    ids = model.processor.encode(texts[start:start + batch], out_type=int,
                                 add_eos=True, num_threads=threads)
    out.extend(np.asarray(i, np.int32) for i in ids)
  return out


def pack(docs: Sequence[np.ndarray], seq_len: int) -> np.ndarray:
  """Documents -> full training windows of seq_len + 1 ids, no padding.

  The stream is EOD, doc_0, doc_1, ... (each document already ends with EOD,
  as from `encode_documents`; the leading EOD makes the first document's first
  token a target like every other document's). Window k is
  stream[k*L : k*L + L + 1], so consecutive windows overlap by one id, every
  stream id after the first is a target exactly once, and a tail too short
  for a full window (< L ids) is dropped. Windows cross document boundaries;
  a model sees EOD and keeps going, as in GPT-style packing.

  Args:
    docs: int arrays, each ending with EOD.
    seq_len: L.

  Returns:
    int32 [num_windows, L + 1] (no rows when the stream has < L + 1 ids).
  """
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be positive")
  for i, d in enumerate(docs):
    if len(d) == 0 or d[-1] != EOD:
      raise ValueError(f"document {i} does not end with EOD={EOD}")
  stream = np.concatenate([np.array([EOD], np.int32)]
                          + [np.asarray(d, np.int32) for d in docs])
  num = (len(stream) - 1) // seq_len
  starts = np.arange(num, dtype=np.int64)[:, None] * seq_len
  return stream[starts + np.arange(seq_len + 1)]

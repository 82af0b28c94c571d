"""lm1b / C4-style language modelling from tfds ArrayRecord files, no TF.

For the paper-scale language-model runs: any tfds dataset with a 'text'
feature, read through `tfds.data_source`'s random-access ArrayRecord reader
and tokenised on grain threads. The batch layout is kernel_docs's: inputs,
labels (shifted by one) and weights, int32/float32 [b, seq_len].

  vocab:    `tokenizer.Tokenizer` on the first `config.data.vocab_examples`
            examples of the train split, cached under `config.data.cache_dir`
            ('' = ~/.cache/codistill_jax).
  examples: one example = one row: its ids + EOD, the first seq_len + 1 of
            them, padded (padding targets weigh 0). Long documents are cut, not
            continued in more rows: a record maps to exactly one row, which
            keeps every split random-access, so the train stream is seekable
            without an index of window offsets. Fine for lm1b's sentences; for
            C4 it trains on each document's head only.

Splits are tfds's (e.g. train_split='train', eval_splits={'validation':
'test'} for lm1b; slicing like 'train[:1%]' works).

Config fields (config.data.*): tfds_name, data_dir ('' = tfds default),
vocab_size, seq_len, vocab_examples, train_split, eval_splits ({name: tfds
split}), cache_dir, batch_size, eval_batch_size, split_seed (seeds the group
partition), partition.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import numpy as np

from codistill_jax.data import lm
from codistill_jax.data import pipeline
from codistill_jax.data import sources
from codistill_jax.data import tokenizer as tokenizer_lib

# Bump when the tokenizer changes meaning, so old cached vocabularies go unused.
_CACHE_VERSION = 1


# Ranges of this module's config.data fields (config_lib.check_ranges).
RANGES = {"vocab_size": f"> {len(tokenizer_lib.SPECIALS)}", "seq_len": "> 0",
          "vocab_examples": "> 0"}


def check(config) -> None:
  """Cheap checks: names and sizes given, data_dir exists if set."""
  sources.check_tfds_source(config, "lm1b")


def text_of(example) -> str:
  text = example["text"]
  # Real ArrayRecord sources give bytes, tfds's mocks give str.
  return text.decode("utf-8", "replace") if isinstance(text, bytes) else text


def vocabulary(config, builder, source) -> tuple[tokenizer_lib.Tokenizer, str]:
  """The tokenizer of the first vocab_examples train examples, cached.

  Returns:
    (tokenizer, path of its JSON)
  """
  data = config.data
  count = min(data.vocab_examples, len(source))
  data_dir = os.path.abspath(data.data_dir) if data.data_dir else ""
  blob = json.dumps({"name": data.tfds_name, "version": str(builder.version),
                     "data_dir": data_dir,
                     "split": data.train_split, "size": len(source),
                     "vocab_size": data.vocab_size, "examples": count,
                     "format": _CACHE_VERSION})
  key = hashlib.sha256(blob.encode()).hexdigest()[:20]
  name = data.tfds_name.replace("/", "_")
  path = os.path.join(sources.cache_dir(config), f"{name}-{key}.vocab.json")
  if os.path.exists(path):
    return tokenizer_lib.Tokenizer.load(path), path
  tok = tokenizer_lib.Tokenizer.build(
      (text_of(source[i]) for i in range(count)), data.vocab_size)
  tok.save(path)
  return tok, path


def _example(source, tok: tokenizer_lib.Tokenizer, seq_len: int,
             index: int) -> dict:
  ids = np.append(tok.encode(text_of(source[index])),
                  np.int32(tokenizer_lib.EOD))
  window = lm.lm_windows(ids[:seq_len + 1], seq_len, tokenizer_lib.PAD)
  if not len(window):  # Nothing to predict (an empty text): all padding.
    window = np.full((1, seq_len + 1), tokenizer_lib.PAD, np.int32)
  return lm.lm_batch(window[0], tokenizer_lib.PAD)


def get_datasets(config, *, group: int, num_groups: int, process_index: int,
                 process_count: int) -> pipeline.Datasets:
  check(config)
  builder, split_sources = sources.open_tfds(config)
  tok, vocab_path = vocabulary(config, builder, split_sources["train"])
  splits = {name: pipeline.RecordSplit(len(source), functools.partial(
      _example, source, tok, config.data.seq_len))
            for name, source in split_sources.items()}
  info = {"vocab_size": tok.vocab_size, "max_len": config.data.seq_len,
          "pad_id": tokenizer_lib.PAD, "eod_id": tokenizer_lib.EOD,
          "vocab_path": vocab_path}
  return pipeline.assemble(config, splits, info, group=group,
                         num_groups=num_groups, process_index=process_index,
                         process_count=process_count)

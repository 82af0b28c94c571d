"""Listing and reading the corpus's documents: ids, order, cleaned texts.

`documents(sources, roots)` lists every document of the named sources in a
fixed order; `read` / `texts` give their cleaned text (a file's cleaner, or
its piece of a file that holds many, read once and cached); `parse_doc_id`
takes an id apart.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple

from codistill_jax.data.corpus.cleaners.lightweight import clean_rst
from codistill_jax.data.corpus.cleaners.markup import clean_html
from codistill_jax.data.corpus.cleaners.plain import clean_plain
from codistill_jax.data.corpus.registry import SOURCES
from codistill_jax.data.corpus.registry import Source
from codistill_jax.data.corpus.registry import get_source
from codistill_jax.data.corpus.registry import root_of
from codistill_jax.data.corpus.registry import source_files
from codistill_jax.errors import ConfigError


class Document(NamedTuple):
  """One document: a stable id and the file that holds it.

  Attributes:
    doc_id: '<source>:<relative path>' or '<source>:<relative path>#<k>'.
    path: the absolute path of the file.
  """
  doc_id: str
  path: str


def _cleaner(source: Source, path: str) -> Callable[[bytes], str]:
  """The source's cleaner; a mixed source (clean=None) goes by extension."""
  if source.clean is not None:
    return source.clean
  if path.endswith(".rst.txt"):
    return clean_rst
  if path.endswith(".html"):
    return clean_html
  return clean_plain


def _stamp(path: str) -> tuple[int, int]:
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _parts(name: str, path: str, stamp: tuple[int, int]) -> tuple[str, ...]:
  del stamp  # Only keys the cache: a changed file is read again.
  return tuple(get_source(name).read(path))


def _source_names(sources: str | Iterable[str]) -> list[str]:
  if isinstance(sources, str):
    sources = [s.strip() for s in sources.split(",")]
  names = [s for s in sources if s]
  if not names:
    raise ConfigError("config.data.sources is empty; name at least one of "
                      f"{', '.join(SOURCES)}")
  if len(set(names)) != len(names):
    raise ConfigError(f"config.data.sources={names}: a source is repeated")
  return names


def documents(sources: str | Iterable[str],
              roots: Mapping[str, str] | None = None) -> list[Document]:
  """Every document of the named sources, in a fixed order.

  Args:
    sources: names of `SOURCES` (a list, or a comma-separated string).
    roots: name -> root directory overrides (config.data.roots); a missing or
      empty entry means the source's default.

  Returns:
    Documents in source order, then file order (sorted relative paths), then
    piece order. Files that hold many documents are read (once, cached) to
    count their pieces.

  Raises:
    ConfigError: an unknown or missing source.
  """
  docs = []
  for name in _source_names(sources):
    source = get_source(name)
    root = root_of(name, roots)
    for rel in source_files(name, roots):
      path = os.path.join(root, rel)
      if source.read is None:
        docs.append(Document(f"{name}:{rel}", path))
      else:
        count = len(_parts(name, path, _stamp(path)))
        docs.extend(Document(f"{name}:{rel}#{k}", path) for k in range(count))
  return docs


def parse_doc_id(doc_id: str) -> tuple[str, str, int | None]:
  """'<source>:<rel>[#k]' -> (source, rel, k or None)."""
  name, _, rest = doc_id.partition(":")
  rel, hash_, part = rest.rpartition("#")
  if hash_ and part.isdigit() and name in SOURCES and \
      SOURCES[name].read is not None:
    return name, rel, int(part)
  return name, rest, None


def read_text(source: str, path: str, part: int | None = None) -> str:
  """The cleaned text of one file of `source` (or of its `part`-th piece).

  Args:
    source: a name of `SOURCES`.
    path: the file.
    part: for a file that holds many documents, which one; None joins them.

  Returns:
    Plain text.
  """
  src = get_source(source)
  if src.read is not None:
    parts = _parts(source, path, _stamp(path))
    return "\n\n".join(parts) if part is None else parts[part]
  with open(path, "rb") as f:
    data = f.read()
  return _cleaner(src, path)(data)


def read(doc: Document) -> str:
  """The cleaned text of a document from `documents`."""
  name, _, part = parse_doc_id(doc.doc_id)
  return read_text(name, doc.path, part)


def texts(docs: Iterable[Document]) -> Iterator[str]:
  """The cleaned texts of `docs`, in order."""
  for doc in docs:
    yield read(doc)


def count_words(text: str) -> int:
  return len(text.split())

"""Files that hold many documents: dictd dictionaries, WordNet, SWORD modules.

Each `read_*` takes a file's path and returns its documents, cleaned: a
dictionary's entries joined into documents of about `DICT_DOC_WORDS` words,
a Bible's books, a commentary's chapters. So a document-level split never
puts a whole dictionary on one side.
"""

import gzip
import os
import re
import struct
from typing import Sequence
import zlib

from codistill_jax.data.corpus.cleaners.markup import clean_osis
from codistill_jax.data.corpus.cleaners.plain import decode
from codistill_jax.data.corpus.cleaners.plain import tidy

# GCIDE's attribution lines ('[1913 Webster]', '[WordNet 1.5 +PJC]', ...):
# one after nearly every sense, and they say where a sense came from, not
# anything about the word.
_GCIDE_SOURCE = re.compile(
    r"^\s*\[(?:\s*\+?\s*(?:1913 Webster|Webster 1913 Suppl\.|WordNet"
    r"(?: \d\.\d| sense \d+)?|PJC\.?|Century Dict\.,? \d{4}|AS|RDH|RP|GG|"
    r"DC|JS|MW|F|NIH|Chambers \d{4})\s*)+\]\s*$")
# GCIDE's pronunciation field after the headword: \Ab*bre"vi*ate\ in some
# letters, (f[imac]"broid) in others: syllable marks and accent codes.
_GCIDE_PRON = re.compile(
    r" ?\\[^\\\n]{1,80}\\| ?\((?=[^()]*[\"*\[?])[^()]{1,200}\)")
_DICTD_XREF = re.compile(r"\{([^{}]*)\}")
# A dictd entry starts at an unindented line after a blank one.
_DICTD_ENTRY = re.compile(r"\n\s*\n(?=\S)")
# A dictionary is cut into documents of about this many words.
DICT_DOC_WORDS = 4000


def _chunk(items: Sequence[str], words: int) -> list[str]:
  """Consecutive items joined into documents of at least `words` words."""
  docs, current, count = [], [], 0
  for item in items:
    current.append(item)
    count += len(item.split())
    if count >= words:
      docs.append("\n\n".join(current))
      current, count = [], 0
  if current:
    docs.append("\n\n".join(current))
  return docs


def dictd_entries(text: str) -> list[str]:
  """The entries of a dictd database (its text, decompressed), cleaned.

  The '00-database-*' entries (the database's own metadata and licence) are
  dropped; GCIDE's attribution lines and pronunciation fields go; {cross
  references} keep their words; indentation is removed.
  """
  entries = []
  for entry in _DICTD_ENTRY.split("\n" + text):
    entry = entry.strip("\n")
    if not entry.strip() or entry.lstrip().startswith(("00-database",
                                                       "00database")):
      continue
    lines = [line.strip() for line in entry.split("\n")
             if not _GCIDE_SOURCE.match(line)]
    entry = _DICTD_XREF.sub(r"\1", "\n".join(lines))
    for _ in range(3):  # \spelling\ and (sound) may both follow the word.
      pron = _GCIDE_PRON.search(entry)
      first_line = entry.find("\n")
      if first_line < 0:
        first_line = len(entry)
      if not pron or pron.start() >= first_line:
        break
      entry = entry[:pron.start()] + entry[pron.end():]
    entries.append(tidy(entry))
  return entries


def read_dictd(path: str) -> list[str]:
  """A dictd database (.dict or dictzip'ed .dict.dz) as documents."""
  with open(path, "rb") as f:
    data = f.read()
  if data[:2] == b"\x1f\x8b":
    data = gzip.decompress(data)   # dictzip is gzip with a seek table.
  return _chunk(dictd_entries(decode(data)), DICT_DOC_WORDS)


def wordnet_glosses(text: str) -> list[str]:
  """WordNet data.{noun,verb,adj,adv} -> 'word, word: gloss' per synset."""
  out = []
  for line in text.split("\n"):
    if not line[:1].isdigit() or " | " not in line:
      continue  # The licence header lines start with two spaces.
    fields, gloss = line.split(" | ", 1)
    parts = fields.split()
    count = int(parts[3], 16)
    words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ")
             for w in parts[4:4 + 2 * count:2]]
    out.append(f"{', '.join(words)}: {gloss.strip()}")
  return out


def read_wordnet(path: str) -> list[str]:
  with open(path, "rb") as f:
    glosses = wordnet_glosses(decode(f.read()))
  return [tidy(doc) for doc in _chunk(glosses, DICT_DOC_WORDS)]


def read_sword(path: str) -> list[str]:
  """A SWORD zText/zCom testament (its .bzz or .czz) as one doc per block.

  A module's blocks are its books (or chapters: BlockType in its .conf), so
  a document is a book of a Bible or a chapter of a commentary. Each block is
  zlib-compressed; the verse index (.bzv: block u32, offset u32, size u16, or
  .czv with a u32 size) says where each verse's OSIS text lies in it.
  """
  stem, ext = os.path.splitext(path)
  four = ext == ".czz"
  letter = ext[1]
  with open(f"{stem}.{letter}zs", "rb") as f:
    index = f.read()
  with open(f"{stem}.{letter}zv", "rb") as f:
    verses = f.read()
  with open(path, "rb") as f:
    data = f.read()
  blocks = [struct.unpack_from("<III", index, i)
            for i in range(0, len(index) - 11, 12)]
  raw = [zlib.decompress(data[off:off + size]) for off, size, _ in blocks]
  width, fmt = (12, "<III") if four else (10, "<IIH")
  texts: list[list[str]] = [[] for _ in blocks]
  seen = set()
  for i in range(0, len(verses) - width + 1, width):
    entry = struct.unpack_from(fmt, verses, i)
    block, start, size = entry
    # A commentary links every verse of a passage to one shared entry; its
    # text counts once.
    if size and block < len(raw) and entry not in seen:
      seen.add(entry)
      texts[block].append(decode(raw[block][start:start + size]))
  docs = [clean_osis("\n".join(t)) for t in texts]
  return [d for d in docs if len(d.split()) >= 20]


"""Tests of the offline text corpus (`data/corpus/`) and the subword tokenizer
and packing (`spm.py`).

Every test writes its own small files in each source's real format (a Sphinx
page, a DocBook page, reStructuredText, a dictd database in GCIDE's markup,
WordNet's data files, a SWORD module, POD, Vim help, AsciiDoc, Markdown,
Mallard), so none needs the Debian packages. The sentencepiece tests are
skipped when it is not installed.
"""

import dataclasses
import gzip
import hashlib
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from codistill_jax.data import corpus
from codistill_jax.data import spm
from codistill_jax.data import tokenizer as tokenizer_lib
from codistill_jax.data.corpus.cleaners import multidoc
from codistill_jax.errors import ConfigError
from codistill_jax.tools import corpus as corpus_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
  import sentencepiece  # noqa: F401  pylint: disable=unused-import
  HAVE_SPM = True
except ImportError:
  HAVE_SPM = False
needs_spm = pytest.mark.skipif(
    not HAVE_SPM, reason="sentencepiece is not installed "
    "(pip install sentencepiece==0.2.3)")


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)
  return str(path)


# ----------------------------------------------------------------------------
# Cleaners, one per format.
# ----------------------------------------------------------------------------
RST = """\
.. SPDX-License-Identifier: GPL-2.0

.. _spinlocks:

==========
Spin locks
==========

.. toctree::
   :maxdepth: 1

   other-page

A ``spin_lock()`` protects *short* sections; see :ref:`the guide <locking>`
and `LWN <https://lwn.net>`_ [#f1]_.

.. note::
   :class: small

   Never sleep while holding one.

.. kernel-doc:: include/linux/spinlock.h
   :functions: spin_lock

Example::

    spin_lock(&lock);

+-----+-----+
| a   | b   |
+=====+=====+

.. [#f1] A footnote.
"""


def test_clean_rst():
  assert corpus.clean_rst(RST.encode()) == (
      "Spin locks\n\n"
      "A spin_lock() protects short sections; see the guide\n"
      "and LWN.\n\n"
      "   Never sleep while holding one.\n\n"
      "Example:\n\n"
      "    spin_lock(&lock);\n\n"
      "| a   | b   |\n\n"
      "A footnote.")


SPHINX_PAGE = """\
<!DOCTYPE html>
<html><head><title>Ignored title</title><script>var menu = 1;</script>
<style>p { color: red }</style></head>
<body>
<div class="related" role="navigation"><ul><li><a href="i.html">index</a></li>
</ul></div>
<input type="checkbox" class="sidebar-toggle" id="__navigation">
<div class="announcement">Try the new version!</div>
<div class="document"><div class="body" role="main">
<section id="copyright">
<h1>Spin locks<a class="headerlink" href="#spin">\u00b6</a></h1>
<p>A <em>spin lock</em> is a lock &amp; a loop.</p>
<div class="highlight"><pre>spin_lock(&amp;lock);
    do_work();</pre></div>
<p>Second   paragraph
spans lines.</p>
</section></div></div>
<div class="sphinxsidebar" role="navigation"><h3>Navigation</h3></div>
<div class="footer">\u00a9 Copyright people</div>
</body></html>
"""


def test_clean_html_sphinx_page():
  # Only role="main" is kept (not the announcement above it), and the void
  # <input id="__navigation"> must not start a skipped region that never
  # ends (it once swallowed a whole theme's pages).
  assert corpus.clean_html(SPHINX_PAGE.encode()) == (
      "Spin locks\n\n"
      "A spin lock is a lock & a loop.\n\n"
      "spin_lock(&lock);\n"
      "    do_work();\n\n"
      "Second paragraph spans lines.")


DOCBOOK_PAGE = """\
<html><head><title>SELECT</title></head><body>
<div class="navheader"><table><tr><td><a href="prev.html">Prev</a></td>
<td>Up</td></tr></table></div>
<div class="sect1" id="SQL-SELECT"><div class="titlepage"><h2>SELECT</h2></div>
<p>Retrieve rows from a table or view.</p>
<table><tr><td>ALL</td><td>every row</td></tr></table>
</div>
<div class="navfooter"><a href="next.html">Next</a></div>
</body></html>
"""


def test_clean_html_docbook_page_without_main():
  assert corpus.clean_html(DOCBOOK_PAGE.encode()) == (
      "SELECT\n\nRetrieve rows from a table or view.\n\nALL every row")


def test_clean_html_keeps_only_the_named_content_element():
  page = ('<body><div id="Contents">Menu tree</div><div id="DisplayArea">'
          '<h1>Language</h1><p>Opens a submenu.</p></div>'
          '<div id="Index">Index text</div></body>')
  assert corpus.clean_html(page.encode(), keep=("DisplayArea",)) == (
      "Language\n\nOpens a submenu.")
  # Without `keep`, everything that is not chrome stays.
  assert "Menu tree" in corpus.clean_html(page.encode())


MALLARD_PAGE = """\
<page xmlns="http://projectmallard.org/1.0/" type="topic" id="keyboard-osk">
  <info>
    <link type="guide" xref="keyboard"/>
    <credit type="author"><name>Jane Doe</name></credit>
    <desc>Turn on an on-screen keyboard.</desc>
  </info>
  <title>Use an on-screen keyboard</title>
  <p>If you have no <gui>keyboard</gui>, turn on the
  on-screen keyboard.</p>
  <note><p>It also works on touchscreens.</p></note>
</page>
"""


def test_clean_mallard():
  assert corpus.clean_mallard(MALLARD_PAGE.encode()) == (
      "Use an on-screen keyboard\n\n"
      "If you have no keyboard, turn on the on-screen keyboard.\n\n"
      "It also works on touchscreens.")


POD = """\
=pod

=encoding utf8

=head1 NAME

perlfoo - B<Perl> and I<friends>

=head2 Links

See L<perlfunc/open>, L<the docs|perlpod> and L<https://perl.org/>.
Use C<< $a <=> $b >> and E<lt>tagE<gt>.X<index entry>

=over 4

=item * First

Item text.

=back

=begin html

<p>dropped</p>

=end html

=cut

sub code_not_doc { }
"""


def test_clean_pod():
  assert corpus.clean_pod(POD.encode()) == (
      "NAME\n\nperlfoo - Perl and friends\n\nLinks\n\n"
      "See perlfunc open, the docs and https://perl.org/.\n"
      "Use $a <=> $b and <tag>.\n\n"
      "First\n\nItem text.")


VIM_HELP = """\
*foo.txt*\tFor Vim version 9.0.

==============================================================================
1. Introduction\t\t\t\t\t*foo-intro*

Use |:set| to change an option.  Example: >
\t:set ts=8
<
Options summary ~
 vim:tw=78:ts=8:noet:ft=help:norl:
"""


def test_clean_vim_help():
  assert corpus.clean_vim_help(VIM_HELP.encode()) == (
      "\tFor Vim version 9.0.\n\n"
      "1. Introduction\n\n"
      "Use :set to change an option.  Example:\n"
      "\t:set ts=8\n\n"
      "Options summary")


ASCIIDOC = """\
git-foo(1)
==========

NAME
----
git-foo - Do a thing

SYNOPSIS
--------
[verse]
'git foo' [--bar]

DESCRIPTION
-----------
See linkgit:git-commit[1] and <<ref,the reference>>; `--force`{litdd}really.
include::config.txt[]
"""


def test_clean_asciidoc():
  assert corpus.clean_asciidoc(ASCIIDOC.encode()) == (
      "git-foo(1)\n\nNAME\ngit-foo - Do a thing\n\nSYNOPSIS\n'git foo' "
      "[--bar]\n\nDESCRIPTION\n"
      "See git-commit and the reference; --force--really.")


PLAY = """\
# Hamlet

## ACT I

### SCENE I. Elsinore.

_FRANCISCO at his post. Enter to him
BERNARDO_

**BERNARDO**  
Who's there?
"""


def test_clean_markdown():
  assert corpus.clean_markdown(PLAY.encode()) == (
      "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\n"
      "FRANCISCO at his post. Enter to him\nBERNARDO\n\n"
      "BERNARDO\nWho's there?")


# GCIDE as dict-gcide ships it: a dictd database (dictzip = gzip).
GCIDE = """\
00-database-info
   This file was converted from the original database on:
             Tue Feb 15 10:31:36 2022

Apple \\Ap"ple\\ ([a^]p"p'l), n. [OE. appel, AS. [ae]ppel.]
   1. The fleshy pome or fruit of a rosaceous tree.
      [1913 Webster]

            The apple of his eye. --Milton.
      [1913 Webster +PJC]

   2. Any tree of the genus {Malus}. [Obs.]
      [WordNet 1.5]

Apricot \\A"pri*cot\\, n.
   A stone fruit of the rose family.
      [1913 Webster]
"""


def test_dictd_entries_gcide_markup():
  assert corpus.dictd_entries(GCIDE) == [
      ("Apple, n. [OE. appel, AS. [ae]ppel.]\n"
       "1. The fleshy pome or fruit of a rosaceous tree.\n\n"
       "The apple of his eye. --Milton.\n\n"
       "2. Any tree of the genus Malus. [Obs.]"),
      "Apricot, n.\nA stone fruit of the rose family."]


# WordNet's data.noun: a licence header, then one synset a line (offset,
# lexicographer file, type, word count in hex, words with lex ids, pointers,
# '|', gloss); every line ends with two spaces.
WORDNET = "".join(line + "  \n" for line in [
    ("  1 This software and database is being provided to you, the "
     "LICENSEE, by"),
    "  2 Princeton University under the following license.",
    ("00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ "
     "04431553 n 0000 | that which is perceived to have its own distinct "
     "existence"),
    ("00002137 03 n 02 abstraction 0 abstract_entity 0 010 @ 00001740 n 0000 "
     "| a general concept formed by extracting common features"),
    "01000000 00 s 01 able(a) 0 000 | having the means to do something"])


def test_wordnet_glosses():
  assert corpus.wordnet_glosses(WORDNET) == [
      "entity: that which is perceived to have its own distinct existence",
      ("abstraction, abstract entity: a general concept formed by extracting "
       "common features"),
      "able: having the means to do something"]


def _sword_module(directory, testament, blocks, entries, four=False):
  """Writes a SWORD zText/zCom testament: blocks of verse texts.

  entries: (block, verse index in the block) per verse index slot, or None
  for an empty slot; the same pair twice is a linked verse.
  """
  letter = "c" if four else "b"
  index, data, spans = b"", b"", []
  for verses in blocks:
    raw, offsets = b"", []
    for v in verses:
      offsets.append((len(raw), len(v.encode())))
      raw += v.encode()
    comp = zlib.compress(raw)
    index += struct.pack("<III", len(data), len(comp), len(raw))
    data += comp
    spans.append(offsets)
  fmt = "<III" if four else "<IIH"
  verse_index = b""
  for e in entries:
    if e is None:
      verse_index += struct.pack(fmt, 0, 0, 0)
    else:
      start, size = spans[e[0]][e[1]]
      verse_index += struct.pack(fmt, e[0], start, size)
  stem = os.path.join(directory, testament)
  _write(f"{stem}.{letter}zs", index)
  _write(f"{stem}.{letter}zv", verse_index)
  return _write(f"{stem}.{letter}zz", data)


_GENESIS = ('<w lemma="H7225">In the beginning</w> God created the heavens and '
            'the earth.<note placement="foot">1:1 a footnote</note>')
_GENESIS_2 = ("The earth was formless and empty. Darkness was on the surface "
              "of the deep and the Spirit of God was hovering over the waters.")
_EXODUS = ("<title>Exodus</title> Now these are the names of the sons of "
           "Israel, who came into Egypt (every man &amp; his household came "
           "with Jacob).<table><row><cell>The names.</cell><cell>(1-5)</cell>"
           "</row></table>")


def _write_bible(root):
  blocks = [[_GENESIS, _GENESIS_2], [_EXODUS]]
  # Slot 0: an empty header; slots 3 and 4 link to the same text.
  entries = [None, (0, 0), (0, 1), (1, 0), (1, 0)]
  paths = {}
  for module, four in [("texts/ztext/engWEB2015eb", False),
                       ("comments/zcom/mhcc", False),
                       ("comments/zcom/tdavid", True),
                       ("comments/zcom/scofield", False)]:
    paths[module] = _sword_module(os.path.join(root, module), "ot", blocks,
                                  entries, four=four)
  return paths


def test_read_sword_one_document_per_block(tmp_path):
  paths = _write_bible(str(tmp_path))
  for path in paths.values():
    docs = corpus.read_sword(path)
    assert docs == [
        # Verses of a block run on (a verse is not a paragraph).
        "In the beginning God created the heavens and the earth. "
        + _GENESIS_2,
        # The linked verse counts once.
        ("Exodus\nNow these are the names of the sons of Israel, who came "
         "into Egypt (every man & his household came with Jacob).\n\n"
         "The names. (1-5)")]


# ----------------------------------------------------------------------------
# The registry: listing documents, reading them, missing sources.
# ----------------------------------------------------------------------------
def test_documents_ids_order_and_reading(tmp_path, monkeypatch):
  kernel = tmp_path / "kernel"
  _write(kernel / "a" / "b.rst.txt", "Second\n======\n\nText b.\n")
  _write(kernel / "a.rst.txt", RST)
  _write(kernel / "notes.txt", "not a source file")
  dictd = tmp_path / "dictd"
  _write(dictd / "gcide.dict.dz", gzip.compress(GCIDE.encode()))
  bible = tmp_path / "sword"
  _write_bible(str(bible))
  # Two entries of ~10 words per dictionary document: GCIDE's 2 entries make
  # two documents.
  monkeypatch.setattr(multidoc, "DICT_DOC_WORDS", 10)
  roots = {"kernel_docs": str(kernel), "gcide": str(dictd),
           "bible_commentaries": str(bible)}
  docs = corpus.documents(["gcide", "kernel_docs", "bible_commentaries"],
                          roots)
  assert [d.doc_id for d in docs[:4]] == [
      "gcide:gcide.dict.dz#0", "gcide:gcide.dict.dz#1",
      "kernel_docs:a.rst.txt", "kernel_docs:a/b.rst.txt"]
  assert [d.doc_id for d in docs[4:6]] == [
      "bible_commentaries:comments/zcom/mhcc/ot.bzz#0",
      "bible_commentaries:comments/zcom/mhcc/ot.bzz#1"]
  assert len(docs) == 4 + 4 * 2
  assert docs[2].path == str(kernel / "a.rst.txt")
  assert corpus.read(docs[0]).startswith("Apple, n.")
  assert corpus.read(docs[1]).startswith("Apricot, n.")
  assert corpus.read(docs[3]) == "Second\n\nText b."
  assert corpus.read(docs[2]) == corpus.clean_rst(RST.encode())
  # A whole multi-document file, and the same list from a string of names.
  assert corpus.read_text("gcide", docs[0].path) == (
      corpus.read(docs[0]) + "\n\n" + corpus.read(docs[1]))
  assert corpus.documents("gcide, kernel_docs", roots) == docs[:4]
  assert corpus.parse_doc_id("gcide:gcide.dict.dz#1") == (
      "gcide", "gcide.dict.dz", 1)
  assert corpus.parse_doc_id("kernel_docs:a#1.rst.txt") == (
      "kernel_docs", "a#1.rst.txt", None)


def test_missing_and_unknown_sources(tmp_path):
  with pytest.raises(ConfigError) as e:
    corpus.documents(["kernel_docs"], {"kernel_docs": str(tmp_path / "no")})
  message = str(e.value)
  assert "apt-get update && apt-get install -y linux-doc-6.1" in message
  assert "config.data.roots.kernel_docs" in message
  assert "config.data.sources" in message
  # A root without the source's files is as missing as no root.
  with pytest.raises(ConfigError, match="install -y linux-doc-6.1"):
    corpus.documents(["kernel_docs"], {"kernel_docs": str(tmp_path)})
  # Every pattern of a source must match: WordNet without its verbs is not
  # silently a smaller WordNet.
  _write(tmp_path / "wn" / "data.noun", WORDNET)
  with pytest.raises(ConfigError, match="data.verb.*wordnet-base"):
    corpus.documents(["wordnet"], {"wordnet": str(tmp_path / "wn")})
  with pytest.raises(ConfigError, match="unknown source 'nope'"):
    corpus.documents(["nope"])
  with pytest.raises(ConfigError, match="empty"):
    corpus.documents([])
  with pytest.raises(ConfigError, match="repeated"):
    corpus.documents(["gcide", "gcide"])


def test_every_source_is_complete():
  for name, source in corpus.SOURCES.items():
    assert source.name == name
    assert source.install.startswith(("apt-get update && apt-get install -y ",
                                      "pip install ")), name
    assert source.include and source.license, name
    assert (source.clean is None) or (source.read is None), name
  assert set(corpus.GENERAL_ENGLISH) <= set(corpus.SOURCES)


def test_corpus_command_counts_reports_missing_and_rejects_unknown(
    tmp_path, monkeypatch, capsys):
  """`python -m codistill_jax.tools.corpus`: a line per source, `missing:`
  with the install command for one not installed, and a name that is no
  source is one `error:` line naming the known ones, exit 2."""
  kernel = corpus.SOURCES["kernel_docs"]
  _write(tmp_path / "kernel" / "a.rst.txt",
         "Title\n=====\n\nFour words of text.\n")
  monkeypatch.setitem(corpus.SOURCES, "kernel_docs", dataclasses.replace(
      kernel, root=str(tmp_path / "kernel")))
  monkeypatch.setitem(corpus.SOURCES, "gcide", dataclasses.replace(
      corpus.SOURCES["gcide"], root=str(tmp_path / "none")))
  corpus_tool.main(["corpus", "kernel_docs", "gcide"])
  out = capsys.readouterr().out.splitlines()
  assert out[0].split()[:3] == ["kernel_docs", "1", "docs"]
  assert "5 words" in out[0]
  assert out[1].startswith("gcide") and "missing:" in out[1]
  assert "apt-get update && apt-get install -y dict-gcide" in out[1]
  assert out[2].split() == ["total", "5", "words"]
  result = subprocess.run(
      [sys.executable, "-m", "codistill_jax.tools.corpus", "kernel_docs",
       "nope"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  assert result.stdout == ""
  (line,) = result.stderr.splitlines()
  assert line.startswith("error: unknown source 'nope'; known: kernel_docs,")
  assert "scipy_stack_docs" in line


# ----------------------------------------------------------------------------
# spm.py: packing and sampling (numpy only).
# ----------------------------------------------------------------------------
EOD = tokenizer_lib.EOD


def test_pack_small_example():
  docs = [np.array([5, 6, 7, EOD]), np.array([8, EOD]),
          np.array([9, 10, 11, 12, EOD])]
  windows = spm.pack(docs, 3)
  # Stream: EOD 5 6 7 EOD 8 EOD 9 10 11 12 EOD; the tail (12, EOD) is too
  # short for a window and is dropped.
  np.testing.assert_array_equal(windows, [[EOD, 5, 6, 7], [7, EOD, 8, EOD],
                                          [EOD, 9, 10, 11]])
  assert windows.dtype == np.int32


def test_pack_full_windows_every_target_once():
  rng = np.random.default_rng(0)
  docs = [np.append(rng.integers(3, 100, size=rng.integers(0, 30)), EOD)
          for _ in range(40)]
  seq_len = 8
  windows = spm.pack(docs, seq_len)
  stream = np.concatenate([[EOD]] + docs)
  assert (len(stream) - 1) % seq_len  # A partial tail exists to be dropped.
  num = len(windows)
  assert num == (len(stream) - 1) // seq_len
  assert windows.shape == (num, seq_len + 1)
  assert not (windows == tokenizer_lib.PAD).any()
  # Consecutive windows overlap by exactly one id.
  np.testing.assert_array_equal(windows[1:, 0], windows[:-1, -1])
  # The targets are the stream after its first id, each exactly once, in
  # order; what is left over is shorter than one window.
  np.testing.assert_array_equal(windows[:, 1:].ravel(),
                                stream[1:1 + num * seq_len])
  assert len(stream) - 1 - num * seq_len < seq_len
  # Every document's EOD is a target.
  assert (windows[:, 1:] == EOD).sum() >= len(docs) - 1


def test_pack_rejects_documents_without_eod():
  with pytest.raises(ValueError, match="document 1"):
    spm.pack([np.array([4, EOD]), np.array([4, 5])], 4)
  assert spm.pack([np.array([4, EOD])], 4).shape == (0, 5)


def _lines(n):
  words = ["lock", "the", "kernel", "schedules", "tasks", "memory", "page",
           "of", "a", "driver", "reads", "writes", "and", "queue", "irq"]
  # Distinct lines (each ends with its number), so a line names its place.
  return [" ".join(words[(i * 7 + j * 3) % len(words)]
                   for j in range(3 + i % 9)) + f" {i}." for i in range(n)]


def test_sample_lines_fixed_seed_uniform_in_order():
  texts = ["\n".join(_lines(50)[i::5]) + "\n\n" for i in range(5)]
  every = [line for t in texts for line in t.split("\n") if line]
  sample, seen = spm.sample_lines(texts, 20, seed=3)
  assert seen == len(every) == 50
  assert len(sample) == 20
  assert spm.sample_lines(texts, 20, seed=3) == (sample, seen)
  assert spm.sample_lines(texts, 20, seed=4)[0] != sample
  # Corpus order is kept: the sample is a subsequence of all lines.
  positions = [every.index(line) for line in sample]
  assert positions == sorted(positions)
  assert spm.sample_lines(texts, 0)[0] == every
  long_line = " ".join(["word"] * 100)
  pieces, _ = spm.sample_lines([long_line], 0, max_line_bytes=50)
  assert all(len(p) <= 50 for p in pieces) and len(pieces) > 1
  assert " ".join(pieces) == long_line


# ----------------------------------------------------------------------------
# spm.py: training, the cache, encoding.
# ----------------------------------------------------------------------------
def _corpus_docs(tmp_path, n=6):
  docs = []
  for k in range(n):
    path = _write(tmp_path / "docs" / f"d{k}.txt",
                  "\n".join(_lines(60 + k)[k::2]))
    docs.append((f"test:d{k}.txt", path))
  return docs


def _texts(docs):
  for _, path in docs:
    with open(path, encoding="utf-8") as f:
      yield f.read()


def _never():
  raise AssertionError("the cached model was trained again")
  yield  # pylint: disable=unreachable


def test_missing_sentencepiece_names_the_install(tmp_path, monkeypatch):
  monkeypatch.setitem(__import__("sys").modules, "sentencepiece", None)
  with pytest.raises(ConfigError,
                     match=r"pip install sentencepiece==0\.2\.3"):
    spm.train(iter(["some text"]), cache_dir=str(tmp_path), key="k",
              vocab_size=300)


@needs_spm
@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_spm_train_deterministic_and_cached(tmp_path, model_type):
  docs = _corpus_docs(tmp_path)
  key = spm.cache_key(docs, 300, model_type)
  first = spm.train(_texts(docs), cache_dir=str(tmp_path / "a"), key=key,
                    vocab_size=300, model_type=model_type)
  second = spm.train(_texts(docs), cache_dir=str(tmp_path / "b"), key=key,
                     vocab_size=300, model_type=model_type)
  with open(first, "rb") as f, open(second, "rb") as g:
    assert hashlib.sha256(f.read()).digest() == hashlib.sha256(
        g.read()).digest()
  stamp = os.stat(first).st_mtime_ns
  # The cached model is returned without reading a single text.
  assert spm.train(_never(), cache_dir=str(tmp_path / "a"), key=key,
                   vocab_size=300, model_type=model_type) == first
  assert os.stat(first).st_mtime_ns == stamp
  assert os.path.exists(first[:-len(".model")] + ".json")
  assert not [n for n in os.listdir(tmp_path / "a") if ".tmp" in n]


def test_cache_key_names_inputs_and_settings(tmp_path):
  docs = _corpus_docs(tmp_path, n=3)
  key = spm.cache_key(docs, 8000)
  assert spm.cache_key(docs, 8000, spm.DEFAULT_MODEL_TYPE) == key
  assert spm.cache_key(list(reversed(docs)), 8000) == key
  assert spm.cache_key(docs, 16000) != key
  other = {"bpe": "unigram", "unigram": "bpe"}[spm.DEFAULT_MODEL_TYPE]
  assert spm.cache_key(docs, 8000, other) != key
  assert spm.cache_key(docs, 8000, options={"max_lines": 10}) != key
  assert spm.cache_key(docs[:2], 8000) != key
  assert spm.cache_key(docs, 8000, text_version=corpus.VERSION + 1) != key
  st = os.stat(docs[0][1])
  os.utime(docs[0][1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  assert spm.cache_key(docs, 8000) != key
  with pytest.raises(ValueError, match="unknown sentencepiece options"):
    spm.cache_key(docs, 8000, options={"nope": 1})
  with pytest.raises(ConfigError, match="spm_model_type"):
    spm.check(8000, "word")
  with pytest.raises(ConfigError, match="vocab_size"):
    spm.check(200, "unigram")


@needs_spm
def test_spm_special_ids_byte_fallback_and_encoding(tmp_path):
  docs = _corpus_docs(tmp_path)
  path = spm.train(_texts(docs), cache_dir=str(tmp_path / "c"),
                   key=spm.cache_key(docs, 300), vocab_size=300)
  tok = spm.load(path)
  proc = tok.processor
  assert (proc.pad_id(), proc.unk_id(), proc.eos_id(), proc.bos_id()) == (
      0, 1, 2, -1)
  assert [proc.id_to_piece(i) for i in range(3)] == list(
      tokenizer_lib.SPECIALS)
  assert 259 < tok.vocab_size <= 300
  texts = ["the kernel schedules tasks.", "ünïcode 漢字 and\nnew lines", ""]
  encoded = spm.encode_documents(tok, texts, num_threads=2, batch=2)
  assert len(encoded) == 3
  for ids, text in zip(encoded, texts):
    assert ids.dtype == np.int32 and ids[-1] == EOD
    assert EOD not in ids[:-1] and tokenizer_lib.PAD not in ids
    # Byte fallback: nothing is unknown, and the text comes back (newlines
    # and repeated spaces are normalised to one space).
    assert tokenizer_lib.UNK not in ids
    assert tok.decode(ids) == " ".join(text.split())
  np.testing.assert_array_equal(encoded[0][:-1], tok.encode(texts[0]))
  np.testing.assert_array_equal(encoded[2], [EOD])

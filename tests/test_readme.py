"""The README's and docs/'s code blocks run as written, so they cannot drift.

Every ```bash and ```python block of README.md and docs/*.md is preceded by a
marker saying how the test treats it:

  <!-- readme-test: run -->             run as written
  <!-- readme-test: quick -->           run with each `--config=configs/x.py`
                                        at its `:quick` size
  <!-- readme-test: skip: <reason> -->  not runnable here (a cluster, a GPU)
  ...; needs: <path or module> ...      skipped, saying so, where a dataset
                                        (a path: an apt package's files) or
                                        an optional module (a name: libtpu)
                                        is missing

```text blocks (diagrams, printed output) are not code and need none; a fence
of any other language, or of none, fails the test.

Each block is one test, named by its file and line (`README.md:26`,
`docs/scale.md:40`), so `-k docs/scale.md` runs one page. The blocks of one
file share a temporary directory that `/tmp/` points into, and a bash block
first runs the earlier bash blocks of its file that have not run yet in this
session (so a later block finds an earlier one's run, also when selected
alone); files do not share runs. Their `pip install` steps are checked
against setup.py's extras rather than run again (CI installs the package
first). Bash blocks are `slow`; python blocks run alone, without /tmp
rewriting, and are in the quick subset.
"""

import ast
import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from tests.test_train import ROOT

README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
_FENCE = re.compile(r"^```(.*)$")
_MARK = re.compile(r"<!-- readme-test: (.*?) -->\s*$")
_CODE = ("bash", "python")


def doc_files() -> list[str]:
  """README.md, then docs/*.md, as paths relative to the repository root."""
  return ["README.md"] + sorted(
      os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(DOCS, "*.md")))


def blocks(doc: str = "README.md"):
  """[(language, directive or None, code, line)] of every fenced block.

  `line` is the 1-based line of the opening fence; the directive is the
  marker on the last non-blank line before it.
  """
  lines = open(os.path.join(ROOT, doc)).read().split("\n")
  out, i = [], 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    start = i
    prev = next((l for l in reversed(lines[:start]) if l.strip()), "")
    mark = _MARK.match(prev)
    i += 1
    while i < len(lines) and lines[i].rstrip() != "```":
      i += 1
    assert i < len(lines), f"{doc}:{start + 1}: unclosed code fence"
    out.append((m.group(1).strip(), mark.group(1) if mark else None,
                "\n".join(lines[start + 1:i]) + "\n", start + 1))
    i += 1
  return out


def _extras() -> set[str]:
  tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == "extras_require":
      return {k.value for k in node.value.keys}
  return set()


def _without_installs(code: str, where: str) -> str:
  """Drops `pip install ...` steps, checking the extras they name exist."""
  extras = _extras()
  steps = []
  for part in re.split(r"\s*&&\s*|\n(?!\s)", code.replace("\\\n", " ")):
    if part.strip().startswith("pip install"):
      for group in re.findall(r"\.\[([\w,]+)\]", part):
        for extra in group.split(","):
          assert extra in extras, f"{where}: no extra {extra!r}"
      continue
    steps.append(part)
  return "\n".join(steps)


def _quick(code: str) -> str:
  def repl(m):
    path, arg = m.group(1), m.group(2)
    return f"--config={path}:{arg + ',' if arg else ''}quick"
  return re.sub(r"--config=(configs/\w+\.py)(?::([\w=,]+))?", repl, code)


def _missing(mark: str) -> list[str]:
  """What a block's `needs:` names that this machine lacks."""
  needs = mark.partition("; needs:")[2]
  return [p for p in needs.split() if not (
      os.path.exists(p) if p.startswith("/") else
      importlib.util.find_spec(p) is not None)]


def _all_blocks():
  return [(doc, *b) for doc in doc_files() for b in blocks(doc)]


def _params():
  out = []
  for doc, lang, mark, _, line in _all_blocks():
    if lang in _CODE:
      out.append(pytest.param(
          doc, line, id=f"{doc}:{line}",
          marks=[pytest.mark.slow] if lang == "bash" else []))
  return out


def test_every_block_says_how_it_is_tested():
  for doc, lang, mark, _, line in _all_blocks():
    where = f"{doc}:{line}"
    assert lang in _CODE + ("text",), (
        f"{where}: a ```{lang} block; label it bash, python (both run) or "
        "text (not code)")
    if lang == "text":
      continue
    assert mark is not None, (
        f"{where}: a {lang} block without a marker; put "
        "<!-- readme-test: run|quick|skip: <reason> --> on the line before")
    kind = mark.partition(";")[0].strip()
    assert kind in ("run", "quick") or kind.startswith("skip:"), (where, mark)
    if kind.startswith("skip"):
      assert len(mark.split(":", 1)[-1].strip()) > 5, (where, "give a reason")
  runnable = [line for _, lang, mark, _, line in _all_blocks()
              if lang == "bash" and not mark.startswith("skip")]
  assert len(runnable) >= 8, "the docs lost their commands?"


# (doc, line) -> None (ran) or the reason it failed, for this session.
_RAN: dict[tuple[str, int], str | None] = {}


@pytest.fixture(scope="session")
def doc_tmp(tmp_path_factory):
  """One temporary directory per documentation file, made on first use."""
  dirs = {}
  def get(doc):
    if doc not in dirs:
      dirs[doc] = tmp_path_factory.mktemp(re.sub(r"\W", "_", doc))
    return dirs[doc]
  return get


def _run_bash(doc: str, mark: str, code: str, line: int, tmp) -> str | None:
  """Runs one bash block; None, or why it failed."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  script = _without_installs(code, f"{doc}:{line}").replace("/tmp/",
                                                             f"{tmp}/")
  if mark.partition(";")[0].strip() == "quick":
    script = _quick(script)
  result = subprocess.run(["bash", "-euo", "pipefail", "-c", script],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
  if result.returncode == 0:
    return None
  return (f"{doc}:{line} failed (exit {result.returncode}):\n{script}\n"
          f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n"
          f"{result.stderr[-3000:]}")


def _runnable(lang: str, mark: str) -> bool:
  return lang == "bash" and not mark.startswith("skip") and not _missing(mark)


@pytest.mark.parametrize("doc,line", _params())
def test_block_runs_as_written(doc, line, doc_tmp):
  found = {b[3]: b for b in blocks(doc)}
  lang, mark, code, _ = found[line]
  assert mark is not None, f"{doc}:{line}: no marker"
  if mark.startswith("skip"):
    pytest.skip(f"{doc}:{line}: {mark.split(':', 1)[1].strip()}")
  if missing := _missing(mark):
    pytest.skip(f"{doc}:{line}: needs {' '.join(missing)}")
  if lang == "python":
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, (f"{doc}:{line}\n"
                                    f"{result.stderr[-3000:]}")
    return
  tmp = doc_tmp(doc)
  for b_lang, b_mark, b_code, b_line in blocks(doc):
    if b_line >= line:
      break
    if _runnable(b_lang, b_mark) and (doc, b_line) not in _RAN:
      _RAN[doc, b_line] = _run_bash(doc, b_mark, b_code, b_line, tmp)
  _RAN[doc, line] = failure = _run_bash(doc, mark, code, line, tmp)
  earlier = [l for (d, l), f in _RAN.items() if d == doc and l < line and f]
  assert failure is None, failure + (
      f"\n(earlier blocks of {doc} that failed: lines {earlier})"
      if earlier else "")


def test_files_the_docs_name_exist():
  """Paths of the repository named in the docs and the configs exist."""
  texts = [open(os.path.join(ROOT, d)).read() for d in doc_files()]
  texts += [open(p).read()
            for p in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))]
  named = set()
  for text in texts:
    named |= set(re.findall(
        r"\b((?:codistill_jax|experiments|configs|tests|docs)/[\w/]+"
        r"\.(?:py|md|json))", text))
  missing = sorted(p for p in named if not os.path.exists(os.path.join(ROOT,
                                                                       p)))
  assert not missing, missing


def test_links_resolve_and_every_page_is_indexed():
  """Relative links point at files; README and docs/README.md list each page."""
  broken = []
  for doc in doc_files():
    text = open(os.path.join(ROOT, doc)).read()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"\w+://|#|mailto:", target):
        continue
      path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc),
                                           target.split("#")[0]))
      if not os.path.exists(path):
        broken.append(f"{doc}: {target}")
  assert not broken, broken
  pages = {os.path.basename(d) for d in doc_files()[1:]} - {"README.md"}
  for index, prefix in (("README.md", "docs/"), ("docs/README.md", "")):
    text = open(os.path.join(ROOT, index)).read()
    unlisted = sorted(p for p in pages if f"]({prefix}{p})" not in text)
    assert not unlisted, f"{index} does not link {unlisted}"

"""The README's command blocks run as written, so the README cannot drift.

Every ```bash block is preceded by a marker saying how the test treats it:

  <!-- readme-test: run -->             run as written
  <!-- readme-test: quick -->           run with each `--config=configs/x.py`
                                        at its `:quick` size
  <!-- readme-test: skip: <reason> -->  not runnable here (a cluster, a GPU)
  ...; needs: <path or module> ...      skipped, saying so, where a dataset
                                        of DATA.md (a path) or an optional
                                        module (a name: libtpu) is missing

Blocks run in order in one shell each, with `/tmp/` pointing into the test's
own temporary directory (so a later block finds an earlier one's run). Their
`pip install` steps are checked against setup.py's extras rather than run
again (CI installs the package first). ```python blocks are executed too.
"""

import ast
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from tests.test_train import ROOT

README = os.path.join(ROOT, "README.md")
_BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
_MARK = re.compile(r"<!-- readme-test: (.*?) -->\s*$")


def blocks():
  """[(language, directive or None, code, line)] of every fenced block."""
  text = open(README).read()
  out = []
  for m in _BLOCK.finditer(text):
    before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
    mark = _MARK.match(before)
    out.append((m.group(1), mark.group(1) if mark else None, m.group(2),
                text[:m.start()].count("\n") + 1))
  return out


def _extras() -> set[str]:
  tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == "extras_require":
      return {k.value for k in node.value.keys}
  return set()


def _without_installs(code: str, line: int) -> str:
  """Drops `pip install ...` steps, checking the extras they name exist."""
  extras = _extras()
  steps = []
  for part in re.split(r"\s*&&\s*|\n(?!\s)", code.replace("\\\n", " ")):
    if part.strip().startswith("pip install"):
      for group in re.findall(r"\.\[([\w,]+)\]", part):
        for extra in group.split(","):
          assert extra in extras, f"README line {line}: no extra {extra!r}"
      continue
    steps.append(part)
  return "\n".join(steps)


def _quick(code: str) -> str:
  def repl(m):
    path, arg = m.group(1), m.group(2)
    return f"--config={path}:{arg + ',' if arg else ''}quick"
  return re.sub(r"--config=(configs/\w+\.py)(?::([\w=,]+))?", repl, code)


def test_every_block_says_how_it_is_tested():
  unmarked = [line for lang, mark, _, line in blocks()
              if lang == "bash" and mark is None]
  assert not unmarked, f"README bash blocks without a marker at {unmarked}"
  for lang, mark, _, line in blocks():
    if mark and mark.startswith("skip"):
      assert len(mark.split(":", 1)[-1].strip()) > 5, (line, "give a reason")


@pytest.mark.slow
def test_every_shell_block_runs_as_written(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  ran, skipped = 0, []
  for lang, mark, code, line in blocks():
    if lang != "bash" or mark.startswith("skip"):
      continue
    kind, _, needs = mark.partition("; needs:")
    missing = [p for p in needs.split() if not (
        os.path.exists(p) if p.startswith("/") else
        importlib.util.find_spec(p) is not None)]
    if missing:
      skipped.append((line, missing))
      continue
    script = _without_installs(code, line).replace("/tmp/", f"{tmp_path}/")
    if kind.strip() == "quick":
      script = _quick(script)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script],
                            cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, (
        f"README block at line {line} failed (exit {result.returncode}):\n"
        f"{script}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n"
        f"{result.stderr[-3000:]}")
    ran += 1
  print(f"ran {ran} README blocks; skipped for missing data: {skipped}")
  assert ran >= 8 - len(skipped)


def test_python_blocks_run():
  code = [c for lang, _, c, _ in blocks() if lang == "python"]
  assert code
  for c in code:
    result = subprocess.run([sys.executable, "-c", c], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]


def test_files_the_docs_name_exist():
  """Paths of the repository named in the README and the configs exist."""
  texts = [open(README).read()] + [open(p).read() for p in sorted(
      __import__("glob").glob(os.path.join(ROOT, "configs", "*.py")))]
  named = set()
  for text in texts:
    named |= set(re.findall(
        r"\b((?:codistill_jax|experiments|configs|tests)/[\w/]+\.(?:py|md|json))",
        text))
  missing = sorted(p for p in named if not os.path.exists(os.path.join(ROOT,
                                                                       p)))
  assert not missing, missing

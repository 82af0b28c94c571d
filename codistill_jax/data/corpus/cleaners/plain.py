"""Plain text: the tidying every cleaner ends with, and plain-text files.

`decode` reads a file's bytes as UTF-8 (bad bytes become U+FFFD); `tidy`
normalises line ends and blank lines; `SPACE_RUN` matches the runs of
horizontal whitespace that the markup cleaners fold into one space.
"""

import re

_BLANK_RUN = re.compile(r"\n{3,}")
SPACE_RUN = re.compile(r"[ \t\f\v\r\u00a0]+")


def tidy(text: str) -> str:
  """Strips each line's right end, keeps at most one blank line in a row.

  Indentation is kept (code and verse rely on it); NULs are dropped.
  """
  text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "")
  lines = [line.rstrip() for line in text.split("\n")]
  return _BLANK_RUN.sub("\n\n", "\n".join(lines)).strip("\n")


def decode(data: bytes) -> str:
  return data.decode("utf-8", errors="replace")


def clean_plain(data: bytes) -> str:
  return tidy(decode(data))

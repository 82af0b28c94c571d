"""Lists the English corpus's sources: documents, bytes and words of each.

  python -m codistill_jax.tools.corpus [SOURCE ...]

Every source of `corpus.SOURCES` when none is named. A source that is not
installed prints `missing:` and the command that installs it
(data/corpus/registry.py has the registry); a name that is no source, or a
source named twice, is one `error:` line (naming the known ones), exit code
2, before any source is read.
"""

import time

from codistill_jax import cli
from codistill_jax.data import corpus
from codistill_jax.errors import ConfigError


def main(argv):
  """Prints each installed source's documents, bytes and words (a survey)."""
  names = argv[1:] or list(corpus.SOURCES)
  unknown = [n for n in names if n not in corpus.SOURCES]
  if unknown:
    raise ConfigError(f"unknown source {', '.join(map(repr, unknown))}; "
                      f"known: {', '.join(corpus.SOURCES)}")
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ConfigError(f"source {', '.join(map(repr, twice))} named twice: "
                      "its words would count twice in the total; name each "
                      "source once")
  total = 0
  for name in names:
    start = time.time()
    try:
      docs = corpus.documents([name])
    except ConfigError as e:
      print(f"{name:20s} missing: {e}")
      continue
    chars = words = 0
    for text in corpus.texts(docs):
      chars += len(text)
      words += corpus.count_words(text)
    total += words
    print(f"{name:20s} {len(docs):7d} docs {chars / 1e6:8.1f} M chars "
          f"{words:11,d} words  {time.time() - start:6.1f} s", flush=True)
  print(f"{'total':20s} {total:,d} words")


if __name__ == "__main__":
  cli.run(main, positional=True)

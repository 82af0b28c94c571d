"""When periodic things happen: the one "is it time to X" rule.

Logging, evaluation, checkpoints and the exchange all ask `is_time`, so that
"every N steps, and at the end" means the same thing everywhere (and a test
pins it).
"""


def is_time(step: int, every: int, total: int | None = None) -> bool:
  """Every `every` steps (never at step 0), and at step `total`."""
  return (every > 0 and step > 0 and step % every == 0) or step == total

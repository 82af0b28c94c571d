"""The one exception type for bad user input.

Raised for bad configs, missing dataset files, incompatible checkpoints and the
like. `main.py` turns it into a one-line message and exit code 2; anything else
is an internal error and raises normally.
"""


class ConfigError(ValueError):
  """Bad user input. The message names the field or file and how to fix it."""


class StorageError(ConfigError):
  """The workdir or exchange dir refused a write (full, read-only, ...).

  The message names the path, the reason and the fix. What was being written
  is not committed, so a rerun resumes from the last committed checkpoint.
  """

"""The one exception type for bad user input.

Raised for bad configs, missing dataset files, incompatible checkpoints and the
like. `main.py` turns it into a one-line message and exit code 2; anything else
is an internal error and raises normally.
"""


class ConfigError(ValueError):
  """Bad user input. The message names the field or file and how to fix it."""

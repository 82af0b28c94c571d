"""Command-line entry point: flags in, one call to `train.train_and_evaluate`.

  python -m codistill_jax.main --config=configs/flights.py[:quick] \
      --workdir=/tmp/run [--config.a.b=value ...]

Bad input (unknown or mistyped config fields, a bad config file, a batch that
the devices do not divide, missing data, a workdir of another run) ends with a
one-line `error: ...` message and exit code 2, before anything is compiled or
written.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from codistill_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with ':arg'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and TensorBoard events.")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  """absl's parser, but bad flags give one line and exit code 2."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except ConfigError as e:  # Raised by a config file's get_config(arg).
    _fail(str(e))
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config=configs/flights.py:quick")
  if not _WORKDIR.value:
    _fail("--workdir is required, e.g. --workdir=/tmp/codistill_run")
  return rest


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; config overrides are flags: "
          "--config.a.b=value")
  # Imported here so that `--help` and flag errors do not pay for jax.
  from codistill_jax import train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    _fail(str(e))
  except FloatingPointError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()

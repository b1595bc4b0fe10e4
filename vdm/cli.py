"""What the command-line entry points share: flag parsing and user errors.

A user error (bad config value, missing file, bad flag) ends the program
with one line on stderr naming what is wrong and exit status 2; bugs keep
their traceback.
"""

import contextlib
import sys

from absl import flags

from vdm.config import ConfigError
from vdm.input_pipeline import DataError

USER_ERRORS = (ConfigError, DataError, FileNotFoundError)


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl's parser, with unknown config fields reported in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))
  except (AttributeError, KeyError) as e:  # ml_collections: a field the config does not define
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    name = str(e).strip("'\"")
    _fail(f"unknown config field {name!r} (overrides given: {', '.join(overrides)})")


@contextlib.contextmanager
def user_errors():
  try:
    yield
  except USER_ERRORS as e:
    _fail(str(e))

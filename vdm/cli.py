"""What the command-line entry points share: flag parsing and user errors.

A user error (bad config value, missing file, bad flag) ends the program
with one line on stderr naming what is wrong and exit status 2; bugs keep
their traceback.
"""

import contextlib
import sys

from absl import flags

from vdm import sharding
from vdm.checkpoints import CheckpointError
from vdm.config import ConfigError
from vdm.input_pipeline import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError)


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


_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-host runs "
                                   "(default: auto-detected on SLURM, MPI and TPU pods).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")


def initialize_distributed() -> None:
  """``jax.distributed.initialize`` from the flags, or auto-detected; nothing on one host."""
  with user_errors():
    sharding.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

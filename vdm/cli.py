"""What the command-line entry points share: flag parsing and user errors.

A user error (bad config value, missing file, bad flag) ends the program
with one line on stderr naming what is wrong and exit status 2; bugs keep
their traceback.
"""

import contextlib
import difflib
import os
import re
import sys
from typing import Optional

from absl import flags

from vdm import compilation_cache, sharding
from vdm.checkpoints import MOVED_FIELDS, CheckpointError
from vdm.config import ConfigError
from vdm.input_pipeline import DataError
from vdm.ode import MissingDependency, SolverError

USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError, MissingDependency, SolverError)


def fail(message: str) -> None:
  """Ends the program: one line on stderr, exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


HELP_FLAGS = ("--help", "-h", "--helpshort", "-?", "--helpfull")


def parse_flags(argv):
  """absl's parser: ``--help`` exits 0; a bad ``--config`` path or field is one line and exit 2."""
  if any(a in HELP_FLAGS for a in argv[1:]):
    print(flags.FLAGS.main_module_help())
    if "config" in flags.FLAGS:
      print("\nConfig fields: add --print_config to a command to list every field of a config with its "
            "meaning; override any with --config.SECTION.FIELD=VALUE.")
    sys.exit(0)
  paths = [a.split("=", 1)[1] if "=" in a else b for a, b in zip(argv[1:], argv[2:] + [""])
           if a.startswith("--config=") or a == "--config"]
  try:
    argv = flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    if not e.flagname.startswith("config."):
      fail(str(e))
    fail(_unknown_field_message(e.flagname[len("config."):]))
  except flags.Error as e:
    lines = str(e).strip().splitlines()
    if "config file" in lines[0]:  # the config's get_config() raised: its last line says what
      fail(f"--config: {paths[-1] if paths else ''!r} could not be loaded: {lines[-1]}")
    section = re.match(r"flag --config\.([\w.]+)=.*as a ConfigDict", lines[0])
    if section:  # a value given for a whole section
      field = section.group(1)
      if field in MOVED_FIELDS:
        fail(f"config.{field} is a section now; set config.{MOVED_FIELDS[field]}")
      fail(f"config.{field} is a section; set one of its fields (--print_config lists them)")
    fail(lines[0])
  except SyntaxError as e:  # the config file is not valid Python
    fail(f"--config: {e.filename!r} could not be loaded: SyntaxError: {e.msg} (line {e.lineno})")
  except (AttributeError, KeyError) as e:  # ml_collections: a field the config does not define
    while isinstance(e, BaseException) and e.args:  # ml_collections wraps the KeyError in a KeyError
      e = e.args[0]
    name = str(e).splitlines()[0].strip("'\"")
    given = [a[2:].split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    field = next((g[len("config."):] for g in given if g.split(".")[-1] == name), name)
    hint = re.search(r'Did you mean "(\w+)"', str(e))
    fail(_unknown_field_message(field, hint.group(1) if hint else None))
  if "config" in flags.FLAGS and (paths or flags.FLAGS["config"].value is not None):
    _check_config_loads(paths[-1] if paths else "")
  return argv


def _config_value():
  return flags.FLAGS["config"].value


def _unknown_field_message(field: str, suggestion=None) -> str:
  """'unknown config field config.training.num_step; did you mean config.training.num_steps?'"""
  message = f"unknown config field config.{field}"
  if field in MOVED_FIELDS:
    return message + f"; it moved to config.{MOVED_FIELDS[field]} (the config now has sections)"
  if suggestion:
    return message + f"; did you mean config.{'.'.join(field.split('.')[:-1] + [suggestion])}?"
  try:
    node = _config_value()
    *sections, leaf = field.split(".")
    for section in sections:
      node = node[section]
    close = difflib.get_close_matches(leaf, list(node.keys()), n=1)
    if close:
      message += f"; did you mean config.{'.'.join(sections + close)}?"
  except Exception:  # the config itself did not load, or a section is unknown: no suggestion
    pass
  return message + " (--print_config lists every field)"


def _check_config_loads(path: str) -> None:
  """ml_collections loads ``--config`` lazily and raises on first use; fail here, in one line."""
  try:
    _config_value().keys()
  except Exception as e:  # noqa: BLE001: whatever loading the user's file raised
    if not os.path.isfile(path):
      folder = os.path.dirname(path) or "."
      names = sorted(os.path.join(os.path.dirname(path), f) for f in os.listdir(folder)
                     if f.endswith(".py")) if os.path.isdir(folder) else []
      close = difflib.get_close_matches(path, names, n=1)
      fail(f"--config: no such file {path!r}" + (f"; did you mean {close[0]}?" if close else ""))
    cause = e.__cause__ or e
    fail(f"--config: {path!r} could not be loaded: {type(cause).__name__}: {str(cause).strip().splitlines()[-1]}")


def describe_config(config) -> str:
  """Every field of ``config`` as ``section.field = value  # meaning`` (meanings from configs/base.py)."""
  comments = _field_comments(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                          "configs", "base.py"))
  lines = []

  def walk(node, prefix):
    for key in node.keys():
      value = node[key]
      if hasattr(value, "keys"):
        walk(value, f"{prefix}{key}.")
        continue
      comment = comments.get(prefix + key)
      lines.append(f"{prefix}{key} = {value!r}" + (f"  # {comment}" if comment else ""))

  walk(config, "")
  return "\n".join(lines)


def _field_comments(base_path: str) -> dict:
  """field → its comment (the lines above it and the one beside it) in the base config's source."""
  if not os.path.isfile(base_path):
    return {}
  comments, above = {}, []
  with open(base_path) as f:
    for line in f:
      stripped = line.strip()
      if stripped.startswith("#"):
        above.append(stripped.lstrip("#").strip())
        continue
      match = re.match(r"config\.([\w.]+)\s*=\s*(.*)", stripped)
      if match and "ConfigDict()" not in match.group(2):
        inline = match.group(2).partition("  # ")[2]
        comments[match.group(1)] = " ".join(above + ([inline] if inline else []))
      above = []
  return comments


@contextlib.contextmanager
def user_errors():
  try:
    yield
  except USER_ERRORS as e:
    fail(str(e))


_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-host runs "
                                   "(default: auto-detected on SLURM, MPI and TPU pods).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")


def initialize_distributed() -> None:
  """``jax.distributed.initialize`` from the flags, or auto-detected; nothing on one host."""
  if _COORDINATOR.value and (_NUM_PROCESSES.value is None or _PROCESS_ID.value is None):
    fail("--coordinator_address needs --num_processes and --process_id")
  with user_errors():
    sharding.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "auto", "A folder for XLA's compiled programs, so that a later run of the same programs "
    "(a resumed run, sampling again) loads them instead of compiling: 'auto' = $JAX_COMPILATION_CACHE_DIR if set, "
    "else ~/.cache/vdm/xla/<device> ($XDG_CACHE_HOME honoured); 'none': off (JAX's variable too).")


def enable_compilation_cache() -> Optional[str]:
  """:func:`vdm.compilation_cache.enable` with ``--compilation_cache`` (after :func:`initialize_distributed`,
  before the first compilation); a folder that cannot be made ends the program with one line."""
  try:
    return compilation_cache.enable(_COMPILATION_CACHE.value)
  except OSError as e:
    fail(f"--compilation_cache: cannot create {e.filename or _COMPILATION_CACHE.value!r} ({e.strerror}); "
         f"give another folder, or 'none'")

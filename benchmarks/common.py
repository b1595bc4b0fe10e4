"""What every benchmark shares: where results go and how a record is written."""

import ast
import json
import os

from absl import app, flags

RESULTS = flags.DEFINE_string("results", os.path.join(os.path.dirname(__file__), "results.jsonl"),
                              "Append each JSON record to this file.")


def emit(record: dict) -> None:
  """Prints ``record`` as one JSON line and appends it to ``--results``; notes ``XLA_FLAGS`` if set."""
  if os.environ.get("XLA_FLAGS"):
    record = {**record, "xla_flags": os.environ["XLA_FLAGS"]}
  line = json.dumps(record)
  print(line, flush=True)
  with open(RESULTS.value, "a") as f:
    f.write(line + "\n")


def _value(text: str):
  literal = text[:1].isdigit() or text[:1] == "(" or text in ("True", "False", "None")
  return ast.literal_eval(text) if literal else text


def _split(text: str) -> list[str]:
  """Splits at the commas outside parentheses: "a=(1,2),b=3" → ["a=(1,2)", "b=3"]."""
  parts, depth, start = [], 0, 0
  for i, char in enumerate(text):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if char == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  return parts + [text[start:]]


def variants(sweep: str, specs: list) -> list[dict]:
  """Each variant of ``--sweep=FIELD=V1,V2`` or ``--variant=FIELD=V[,FIELD=V…]`` (repeated) as {field: value};
  [{}] (the config as given) without either."""
  if sweep:
    field, _, values = sweep.partition("=")
    if not field or not values:
      raise app.UsageError(f"--sweep: expected FIELD=V1,V2,… (tuples in parentheses), got {sweep!r}")
    return [{field: _value(v)} for v in _split(values)]
  found = []
  for spec in specs:
    pairs = [p.partition("=") for p in _split(spec)]
    if any(not f or not v for f, _, v in pairs):
      raise app.UsageError(f"--variant: expected FIELD=V[,FIELD=V…], got {spec!r}")
    found.append({f: _value(v) for f, _, v in pairs})
  return found or [{}]


def set_field(config, field: str, value) -> None:
  """``config.<field> = value`` for a dotted ``field`` that the config has."""
  *parents, leaf = field.split(".")
  node = config
  for name in parents:
    node = node[name]
  if leaf not in node:
    raise app.UsageError(f"--sweep: the config has no field {field!r}")
  node[leaf] = value

"""What every benchmark shares: where results go and how a record is written."""

import json
import os

from absl import flags

RESULTS = flags.DEFINE_string("results", os.path.join(os.path.dirname(__file__), "results.jsonl"),
                              "Append each JSON record to this file.")


def emit(record: dict) -> None:
  """Prints ``record`` as one JSON line and appends it to ``--results``."""
  line = json.dumps(record)
  print(line, flush=True)
  with open(RESULTS.value, "a") as f:
    f.write(line + "\n")

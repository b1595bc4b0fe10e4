"""Files a run writes, each written whole or not at all.

A reader (TensorBoard, a script polling ``eval/``, a resumed run) never
sees half a file: each is written under a temporary name in the same folder
and renamed, which POSIX makes atomic.
"""

import contextlib
import json
import os


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
  """Yields a temporary path beside ``path``; renames it to ``path`` when the block succeeds.

  ``suffix``: an ending the writer insists on (``np.savez`` adds ``.npz``).
  The folder is created if needed; on an error the temporary file is removed.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}{suffix}"
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, record: dict) -> None:
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(record, f, indent=2)

"""Stopping cleanly: SIGTERM or Ctrl-C ends training at a step boundary, after a checkpoint.

Clusters send SIGTERM before they take a machine away; the training loop
asks :func:`any_process` after every call, so that all hosts of a run stop
at the same step, write one checkpoint and raise :class:`Preempted`.
"""

import contextlib
import signal
import sys
import threading

import jax
import numpy as np
import tqdm


class Preempted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint of ``step`` was written."""

  def __init__(self, signum: int, step: int, directory: str):
    name = signal.Signals(signum).name
    super().__init__(f"stopped by {name} at step {step}; checkpoint in {directory}; "
                     "run the same command to resume")
    self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM


@contextlib.contextmanager
def stop_signals():
  """Records SIGTERM/SIGINT (yields the list of those received) instead of dying.

  A second Ctrl-C raises KeyboardInterrupt at once, as Python would. Outside
  the main thread signals cannot be caught, and the list stays empty.
  """
  received: list[int] = []
  if threading.current_thread() is not threading.main_thread():
    yield received
    return

  def handler(signum, frame):
    if received and signum == signal.SIGINT:
      raise KeyboardInterrupt
    received.append(signum)
    tqdm.tqdm.write(f"{signal.Signals(signum).name} received: stopping after the current step and writing a "
                    "checkpoint" + (" (Ctrl-C again stops at once, without it)" if signum == signal.SIGINT else ""),
                    file=sys.stderr)

  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield received
  finally:
    for s, old in previous.items():
      signal.signal(s, old)


def any_process(flag: bool) -> bool:
  """True on every process if ``flag`` is True on any (one small allgather; free on one host)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))

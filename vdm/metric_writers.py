"""Metrics to the console, ``<workdir>/metrics.jsonl`` and TensorBoard.

Names are the same everywhere: ``train/bpd``, ``eval/bpd_diff``, … Only the
process that is told to write (process 0) writes anything.
"""

import json
import logging
import os
from typing import Mapping

import numpy as np

try:  # TensorBoard event files, when tensorboardX is installed
  from tensorboardX import SummaryWriter
except ImportError:  # pragma: no cover
  SummaryWriter = None


class MetricWriter:
  """Writes scalar metrics; a no-op unless ``active``."""

  def __init__(self, workdir: str, active: bool = True, echo=logging.info):
    self.active = active
    self._echo = echo
    self._jsonl = None
    self._tb = None
    if active:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      if SummaryWriter is not None:
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.active:
      return
    metrics = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **metrics}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()
    self._echo(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()

"""Datasets → uint8 NHWC batches, sharded per process, resumable by step.

``config.data.dataset`` names the source:

* ``mnist5k``: 5,000 real MNIST digits embedded in the package (4,500 train,
  500 test; see ``vdm/data/LICENSE.txt``);
* ``npz:/path/file.npz``: uint8 arrays ``train`` and ``test``, each
  ``[N, H, W]`` or ``[N, H, W, C]``.

Training order is a fresh seeded permutation every epoch; the batch of step n
is the n-th slice of that endless stream, so the position is the step itself
and a resumed run sees exactly the batches it would have seen.
"""

import dataclasses
import os
from typing import Iterator, Optional

import numpy as np



class DataError(ValueError):
  """A dataset is missing, malformed or not what the config says."""


_EMBEDDED = os.path.join(os.path.dirname(__file__), "data", "mnist5k.npz")


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a dataset: uint8 images ``[N, H, W, C]``."""
  images: np.ndarray

  def __len__(self) -> int:
    return len(self.images)


def _as_nhwc(name: str, array: np.ndarray) -> np.ndarray:
  if array.ndim == 3:
    array = array[..., None]
  if array.ndim != 4 or array.dtype != np.uint8 or len(array) == 0:
    raise DataError(f"{name}: expected a non-empty uint8 array [N, H, W] or [N, H, W, C], "
                     f"got {array.dtype} {array.shape}")
  return array


def _load_npz(path: str, what: str) -> dict[str, Split]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: no file {path!r}")
  with np.load(path) as arrays:
    missing = {"train", "test"} - set(arrays.files)
    if missing:
      raise DataError(f"{what}: {path!r} lacks arrays {sorted(missing)}; it has {arrays.files}")
    splits = {s: Split(_as_nhwc(f"{path}[{s!r}]", arrays[s])) for s in ("train", "test")}
  if splits["train"].images.shape[1:] != splits["test"].images.shape[1:]:
    raise DataError(f"{what}: train and test images differ in shape: "
                     f"{splits['train'].images.shape[1:]} vs {splits['test'].images.shape[1:]}")
  return splits


def load_dataset(dataset: str, data_dir: str = "") -> dict[str, Split]:
  """Loads every split of ``dataset`` into memory as uint8 NHWC arrays."""
  del data_dir  # used by sources that download
  if dataset == "mnist5k":
    return _load_npz(_EMBEDDED, "config.data.dataset='mnist5k'")
  if dataset.startswith("npz:"):
    return _load_npz(dataset[len("npz:"):], "config.data.dataset")
  raise DataError(f"config.data.dataset: unknown dataset {dataset!r}; expected 'mnist5k' or "
                   "'npz:/path/file.npz'")


def train_batches(split: Split, batch_size: int, seed: int, start_step: int = 0,
                  steps_per_call: int = 1, process_index: int = 0,
                  process_count: int = 1) -> Iterator[np.ndarray]:
  """Yields this process's part of each training batch, from ``start_step`` on.

  Args:
    split: the training images.
    batch_size: the global batch; each process gets ``batch_size /
      process_count`` consecutive examples of it.
    seed: seeds the per-epoch permutations.
    start_step: the first step to produce (resume).
    steps_per_call: batches stacked per yield, ``[K, B_local, H, W, C]``
      (K = 1 still has the leading axis).
  """
  n = len(split)
  local = batch_size // process_count
  cache: dict[int, np.ndarray] = {}

  def order(epoch: int) -> np.ndarray:
    if epoch not in cache:
      cache.clear()  # at most two epochs are live at a time
      cache[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
    return cache[epoch]

  step = start_step
  while True:
    batches = []
    for k in range(steps_per_call):
      start = (step + k) * batch_size + process_index * local
      idx = np.arange(start, start + local)
      epochs, offsets = np.divmod(idx, n)
      batches.append(split.images[[order(e)[o] for e, o in zip(epochs, offsets)]])
    yield np.stack(batches)
    step += steps_per_call


def eval_batches(split: Split, batch_size: int, limit: Optional[int] = None, process_index: int = 0,
                 process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Every example of ``split`` (or its first ``limit``) exactly once, in order.

  Yields ``(images, mask)``: the last batch is padded with copies of the
  first image and ``mask`` (float, ``[B_local]``) is 0 on the padding.
  """
  n = len(split) if not limit else min(limit, len(split))
  local = batch_size // process_count
  for start in range(0, n, batch_size):
    idx = np.arange(start + process_index * local, start + (process_index + 1) * local)
    mask = (idx < n).astype(np.float32)
    yield split.images[np.where(idx < n, idx, 0)], mask

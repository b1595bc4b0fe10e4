"""Datasets → uint8 NHWC batches, sharded per process, resumable by step.

``dataset`` (``config.data.dataset``) names the source:

* ``mnist5k``: 5,000 real MNIST digits embedded in the package (4,500 train,
  500 test; see ``vdm/data/LICENSE.txt``);
* ``npz:/path/file.npz``: uint8 arrays ``train`` and ``test``, each
  ``[N, H, W]`` or ``[N, H, W, C]``, optional ``train_labels``/``test_labels``;
* ``folder:/path``: ``train/`` and ``test/`` subfolders of PNG/JPEG images of
  one size and one colour mode (searched recursively; the channel count comes
  from the files);
* any other name is a TensorFlow Datasets image dataset (``cifar10``,
  ``mnist``, ``fashion_mnist``, ``imagenet_resized/32x32``, …) read from
  ``data_dir`` (``config.data.data_dir``) or ``$TFDS_DATA_DIR``. A prepared ArrayRecord
  dataset is read without TensorFlow, image by image on demand; preparing it
  (download + conversion) needs the ``tfds`` install extra.

Training order is a fresh seeded permutation every epoch; the batch of step n
is the n-th slice of that endless stream, so the position is the step itself
(stored in every checkpoint) and a resumed run sees exactly the batches it
would have seen. With ``augment`` each training example is also given one of
the 8 flips/90° rotations, drawn from (seed, step), and its code is passed to
the network as conditioning.
"""

import collections
import dataclasses
import importlib.util
import itertools
import os
import queue
import threading
from typing import Any, Callable, Iterator, Optional

import numpy as np
import tqdm


class DataError(ValueError):
  """A dataset is missing, malformed or does not fit the model.

  ``field`` names the argument at fault (``dataset``, ``augment``,
  ``vocab_size``) and starts the message; code that takes these from a
  config renames it with :meth:`for_field` (``config.data.dataset: …``).
  """

  def __init__(self, message: str, field: Optional[str] = None):
    super().__init__(f"{field}: {message}" if field else message)
    self.message, self.field = message, field

  def for_field(self, name: str) -> "DataError":
    """The same error, its message starting with ``name`` instead of the argument's name."""
    return DataError(self.message, name)


_EMBEDDED = os.path.join(os.path.dirname(__file__), "data", "mnist5k.npz")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NUM_AUGMENTATIONS = 8  # the dihedral group of the square: 4 rotations × optional flip
TFDS_INSTALL = "pip install -e '.[tfds]'"


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a dataset.

  ``images`` is a uint8 array ``[N, H, W, C]`` or an object that behaves
  like one for ``len``, ``.shape``, ``.dtype`` and indexing with an integer
  array (a TFDS source reads and decodes only the images asked for).
  """
  images: Any
  labels: Optional[np.ndarray] = None  # integer class labels [N] (or indexable like them), if the data has them
  num_classes: Optional[int] = None  # how many classes the data set defines; None: the labels' largest + 1

  def label_count(self) -> int:
    """How many classes the labels index: the data set's own count, or the largest label + 1."""
    if self.labels is None:
      return 0
    if self.num_classes is not None:
      return int(self.num_classes)
    return int(np.max(self.labels)) + 1

  def __len__(self) -> int:
    return len(self.images)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.images.shape[1:])

  def max_value(self, sample: int = 1024) -> int:
    """The largest pixel value: all of an in-memory split, ``sample`` spread examples of a lazy one."""
    if isinstance(self.images, np.ndarray):
      return int(self.images.max())
    idx = np.unique(np.linspace(0, len(self) - 1, min(sample, len(self))).astype(np.int64))
    return int(self.images[idx].max())


def check_values(top: int, vocab_size: int, what: str = "the data") -> None:
  """Refuses data values ≥ V (``top``: the largest seen): each gives a meaningless, even negative, likelihood."""
  if top >= vocab_size:
    raise DataError(f"{what} hold values up to {top}, expected all < vocab_size ({vocab_size})",
                    field="vocab_size")


def check_labels(split: Split, num_classes: int, what: str = "the data") -> None:
  """Refuses a class-conditional model (``num_classes`` > 0) on data without labels or with more classes."""
  if not num_classes:
    return
  if split.labels is None:
    raise DataError(f"a class-conditional model needs labels, and {what} has none (npz: 'train_labels' and "
                    "'test_labels' arrays; folder: one sub-folder per class; TFDS: a 'label' feature)",
                    field="num_classes")
  count = split.label_count()
  if count > num_classes:
    raise DataError(f"{what} has labels up to {count - 1}, expected all < num_classes ({num_classes})",
                    field="num_classes")


def _as_nhwc(name: str, array: np.ndarray) -> np.ndarray:
  if array.ndim == 3:
    array = array[..., None]
  if array.ndim != 4 or array.dtype != np.uint8 or len(array) == 0:
    raise DataError(f"{name}: expected a non-empty uint8 array [N, H, W] or [N, H, W, C], "
                     f"got {array.dtype} {array.shape}")
  return array


def _check_same_shape(what: str, splits: dict[str, Split]) -> dict[str, Split]:
  shapes = {name: split.image_shape for name, split in splits.items()}
  if len(set(shapes.values())) > 1:
    raise DataError(f"{what}: the splits' images differ in shape: {shapes}")
  return splits


def _load_npz(path: str, what: str) -> dict[str, Split]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: no file {path!r}")
  with np.load(path) as arrays:
    missing = {"train", "test"} - set(arrays.files)
    if missing:
      raise DataError(f"{what}: {path!r} lacks arrays {sorted(missing)}; it has {arrays.files}")
    splits = {}
    for s in ("train", "test"):
      images = _as_nhwc(f"{path}[{s!r}]", arrays[s])
      labels = arrays[f"{s}_labels"] if f"{s}_labels" in arrays.files else None
      if labels is not None and labels.shape != (len(images),):
        raise DataError(f"{path}[{s + '_labels'!r}]: expected shape ({len(images)},), got {labels.shape}")
      splits[s] = Split(images, labels)
  return _check_same_shape(what, splits)


_MODES = {"L": 1, "RGB": 3}


def _load_folder(root: str, progress: bool = True) -> dict[str, Split]:
  """``root/train`` and ``root/test`` image files → in-memory splits (labels = class subfolders)."""
  from PIL import Image
  what = f"dataset='folder:{root}'"
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{what}: no folder {root!r}")
  splits = {}
  for name in ("train", "test"):
    folder = os.path.join(root, name)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                   if f.lower().endswith(_IMAGE_SUFFIXES))
    if not files:
      raise DataError(f"{what}: expected PNG/JPEG files under {folder!r}, found none")
    found = sorted({os.path.relpath(os.path.dirname(f), folder) for f in files})
    if name == "train":
      classes = found  # the test split's labels index the training split's classes
    labelled = len(classes) > 1 and found != ["."]
    if labelled and set(found) - set(classes):
      raise DataError(f"{what}: {folder!r} has class folders that train/ lacks: {sorted(set(found) - set(classes))}")
    images, first = [], None
    for path in tqdm.tqdm(files, desc=f"reading {name}", disable=not progress or len(files) < 1000,
                          leave=False):
      with Image.open(path) as image:
        mode = image.mode if image.mode in _MODES else ("RGB" if image.mode in ("P", "RGBA", "CMYK", "YCbCr")
                                                          else None)
        if mode is None:
          raise DataError(f"{what}: {path!r} has colour mode {image.mode!r}; expected 8-bit grey (L) or RGB")
        array = np.asarray(image.convert(mode), np.uint8)
      array = array[..., None] if array.ndim == 2 else array
      if first is None:
        first = (path, array.shape)
      elif array.shape != first[1]:
        raise DataError(f"{what}: all images must have one size and colour mode; {path!r} is "
                        f"{array.shape} (H, W, C) but {first[0]!r} is {first[1]}")
      images.append(array)
    labels = (np.array([classes.index(os.path.relpath(os.path.dirname(f), folder)) for f in files], np.int64)
              if labelled else None)
    splits[name] = Split(np.stack(images), labels, num_classes=len(classes) if labelled else None)
  return _check_same_shape(what, splits)


class _TfdsRecords:
  """A TFDS data source that remembers its last read, so images and labels of one batch decode once."""

  def __init__(self, source):
    self.source, self._last = source, (None, None)

  def __len__(self) -> int:
    return len(self.source)

  def read(self, idx: np.ndarray) -> list:
    wanted = tuple(int(i) for i in idx.ravel())
    if self._last[0] != wanted:
      self._last = (wanted, self.source.__getitems__(list(wanted)))
    return self._last[1]


TFDS_CACHE_BYTES = 2 * 2**30  # a TFDS split's feature up to this size decoded is kept in memory as it is read


class _TfdsColumn:
  """One feature of a TFDS split (``image`` or ``label``), read on demand; indexes like an array.

  A feature of at most :data:`TFDS_CACHE_BYTES` (CIFAR-10's 50,000 training
  images: 154 MB) keeps each example once decoded, so from the second epoch
  a batch is a copy from memory instead of ArrayRecord reads and PNG
  decoding (one CPU thread: ~11,000 CIFAR images/s, README: Data).
  """

  def __init__(self, records: _TfdsRecords, key: str, shape: tuple[int, ...], dtype):
    self._records, self._key = records, key
    self.shape = (len(records),) + tuple(shape)
    self.dtype = np.dtype(dtype)
    cached = int(np.prod(self.shape)) * self.dtype.itemsize <= TFDS_CACHE_BYTES
    self._values = np.empty(self.shape, self.dtype) if cached else None  # memory is taken as it is written
    self._have = np.zeros(len(records), bool) if cached else None

  def __len__(self) -> int:
    return self.shape[0]

  def _read(self, idx: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(r[self._key], self.dtype) for r in self._records.read(idx)])

  def __getitem__(self, idx) -> np.ndarray:
    idx = np.asarray(idx)
    if self._values is None:
      return self._read(idx).reshape(idx.shape + self.shape[1:])
    flat = idx.ravel()
    missing = np.unique(flat[~self._have[flat]])
    if missing.size:
      self._values[missing] = self._read(missing)
      self._have[missing] = True
    return self._values[flat].reshape(idx.shape + self.shape[1:])


def tensorflow_available() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _tfds_manual_dir(builder) -> str:
  """``<data dir>/downloads/manual``: TFDS's usual place for files downloaded by hand."""
  return os.path.join(str(builder.data_dir_root), "downloads", "manual")


def _prepare_tfds(tfds, builder, name: str) -> None:
  where = str(builder.data_dir)
  if not tensorflow_available():
    raise DataError(f"the TFDS dataset {name!r} is not prepared in {where!r}, and "
                    f"preparing it needs TensorFlow: {TFDS_INSTALL} (or prepare it elsewhere with `tfds build "
                    f"{name} --file_format=array_record` and point data_dir or "
                    "TFDS_DATA_DIR at that data dir)", field="dataset")
  manual_dir = _tfds_manual_dir(builder)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except Exception as e:  # network, checksum, manual-download and disk errors alike
    detail = " ".join(str(e).split())[:600]
    raise DataError(f"could not download and prepare the TFDS dataset {name!r} into "
                    f"{where!r} ({type(e).__name__}: {detail}). Put the dataset's original files (as named "
                    f"in its TFDS catalog page) in {manual_dir!r} and run again", field="dataset") from e


def _load_tfds(name: str, data_dir: str) -> dict[str, Split]:
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DataError(f"{name!r} is not 'mnist5k', 'npz:…' or 'folder:…', so it is read "
                    f"with TensorFlow Datasets, which is not installed: {TFDS_INSTALL}", field="dataset") from e
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except Exception as e:  # tfds raises DatasetNotFoundError and others for unknown names
    raise DataError(f"unknown dataset {name!r}; expected 'mnist5k', "
                    f"'npz:/path/file.npz', 'folder:/path' or a TFDS image dataset name "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]})", field="dataset") from e
  if not builder.is_prepared():
    _prepare_tfds(tfds, builder, name)
  info = builder.info
  if getattr(info.file_format, "value", info.file_format) != "array_record":
    raise DataError(f"{name!r} in {str(builder.data_dir)!r} was prepared as "
                    f"{info.file_format}, which cannot be read without TensorFlow; rebuild it with "
                    f"`tfds build {name} --file_format=array_record` or choose another data_dir",
                    field="dataset")
  feature = info.features["image"] if "image" in info.features else None
  shape = tuple(getattr(feature, "shape", ()) or ())
  if feature is None or len(shape) != 3 or None in shape or np.dtype(feature.np_dtype) != np.uint8:
    raise DataError(f"{name!r} has no uint8 'image' feature of one fixed size "
                    f"(got {feature!r})", field="dataset")
  test = "test" if "test" in info.splits else "validation"  # imagenet_resized has no test split
  if "train" not in info.splits or test not in info.splits:
    raise DataError(f"{name!r} needs 'train' and 'test' (or 'validation') splits, "
                    f"has {sorted(info.splits)}", field="dataset")
  sources = builder.as_data_source()
  label = info.features["label"] if "label" in info.features else None
  has_labels = getattr(label, "num_classes", None) is not None  # a ClassLabel
  splits = {}
  for name, source in (("train", sources["train"]), ("test", sources[test])):
    records = _TfdsRecords(source)
    splits[name] = Split(_TfdsColumn(records, "image", shape, np.uint8),
                         _TfdsColumn(records, "label", (), np.int64) if has_labels else None,
                         num_classes=label.num_classes if has_labels else None)
  return splits


def load_dataset(dataset: str, data_dir: str = "", progress: bool = True) -> dict[str, Split]:
  """Every split of ``dataset`` as uint8 NHWC (in memory, or read on demand for TFDS)."""
  if not isinstance(dataset, str) or not dataset:
    raise DataError(f"expected a dataset name, got {dataset!r}", field="dataset")
  if dataset == "mnist5k":
    return _load_npz(_EMBEDDED, "dataset='mnist5k'")
  if dataset.startswith("npz:"):
    return _load_npz(dataset[len("npz:"):], "dataset")
  if dataset.startswith("folder:"):
    return _load_folder(dataset[len("folder:"):], progress)
  return _load_tfds(dataset, data_dir)


def augment(images: np.ndarray, codes: np.ndarray) -> np.ndarray:
  """Applies dihedral transform ``codes[i]`` ∈ [0, 8) to square image ``images[i]``.

  Code d rotates by (d mod 4) × 90° counter-clockwise, then flips left–right
  if d ≥ 4; code 0 is the identity.
  """
  out = np.empty_like(images)
  for i, (image, code) in enumerate(zip(images, codes)):
    image = np.rot90(image, k=int(code) % 4, axes=(0, 1))
    out[i] = image[:, ::-1] if code >= 4 else image
  return out


def augmentation_codes(seed: int, step: int, batch_size: int) -> np.ndarray:
  """The augmentation of each example of the global batch of ``step``: a pure function of (seed, step)."""
  return np.random.default_rng([seed, 0x61756720, step]).integers(0, NUM_AUGMENTATIONS, batch_size)


def train_batches(split: Split, batch_size: int, seed: int, start_step: int = 0,
                  steps_per_call: int = 1, process_index: int = 0, process_count: int = 1,
                  augment_data: bool = False, labels: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's part of each training batch, from ``start_step`` on.

  Args:
    split: the training images.
    batch_size: the global batch; each process gets ``batch_size /
      process_count`` consecutive examples of it.
    seed: seeds the per-epoch permutations and the augmentations.
    start_step: the first step to produce (resume).
    steps_per_call: batches stacked per yield (K; K = 1 still has the axis).
    augment_data: flip/rotate each example (square images only).
    labels: also yield each example's class label.
  Yields:
    ``{"images": uint8 [K, B_local, H, W, C]}``, plus ``"augment"``: int32
    ``[K, B_local]`` transform codes (see :func:`augment`) with ``augment_data``,
    and ``"labels"``: int32 ``[K, B_local]`` with ``labels``.
  """
  if augment_data and split.image_shape[0] != split.image_shape[1]:
    raise DataError(f"90° rotations need square images, got {split.image_shape[:2]}", field="augment")
  if labels and split.labels is None:
    raise DataError("a class-conditional model needs labels, and this data set has none", field="num_classes")
  n = len(split)
  local = batch_size // process_count
  cache: dict[int, np.ndarray] = {}

  def order(epoch: int) -> np.ndarray:
    if epoch not in cache:
      if len(cache) > 1:
        cache.pop(min(cache))  # at most two epochs are live at a time
      cache[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
    return cache[epoch]

  step = start_step
  while True:
    images, codes, classes = [], [], []
    for k in range(steps_per_call):
      start = (step + k) * batch_size + process_index * local
      epochs, offsets = np.divmod(np.arange(start, start + local), n)
      idx = np.array([order(e)[o] for e, o in zip(epochs, offsets)])
      batch = np.asarray(split.images[idx])
      if labels:
        classes.append(np.asarray(split.labels[idx]).astype(np.int32))
      if augment_data:
        code = augmentation_codes(seed, step + k, batch_size)[process_index * local:(process_index + 1) * local]
        batch = augment(batch, code)
        codes.append(code.astype(np.int32))
      images.append(batch)
    out = {"images": np.stack(images)}
    if augment_data:
      out["augment"] = np.stack(codes)
    if labels:
      out["labels"] = np.stack(classes)
    yield out
    step += steps_per_call


def eval_batches(split: Split, batch_size: int, limit: Optional[int] = None, process_index: int = 0,
                 process_count: int = 1, labels: bool = False) -> Iterator[tuple[np.ndarray, ...]]:
  """Every example of ``split`` (or its first ``limit``) exactly once, in order.

  Yields ``(images, mask)``: the last batch is padded with copies of the
  first image and ``mask`` (float, ``[B_local]``) is 0 on the padding.
  With ``labels``: ``(images, mask, labels)``, labels int32 ``[B_local]``.
  """
  n = len(split) if not limit else min(limit, len(split))
  local = batch_size // process_count
  for start in range(0, n, batch_size):
    idx = np.arange(start + process_index * local, start + (process_index + 1) * local)
    mask = (idx < n).astype(np.float32)
    idx = np.where(idx < n, idx, 0)
    if labels:
      yield np.asarray(split.images[idx]), mask, np.asarray(split.labels[idx]).astype(np.int32)
    else:
      yield np.asarray(split.images[idx]), mask


def ahead(iterator: Iterator, size: int = 2) -> Iterator:
  """Pulls ``size`` items ahead of the consumer, in the calling thread.

  With items that start asynchronous work when made (JAX's copies to the
  devices), that work overlaps whatever the consumer does meanwhile.
  """
  items = collections.deque(itertools.islice(iterator, size))
  while items:
    yield items.popleft()
    items.extend(itertools.islice(iterator, 1))


def prefetch(iterator: Iterator, size: int = 2, transform: Callable = lambda x: x) -> Iterator:
  """Runs ``iterator`` (and ``transform``) ``size`` items ahead in a thread.

  For host work only (reading, decoding, augmenting): JAX calls from a
  second thread can interleave with a multi-process run's collectives.

  Errors raised in the thread are re-raised in the consumer. Close the
  returned generator when done (``contextlib.closing``): that stops the
  thread and waits for it, so no JAX call is left running at exit.
  """
  items: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()
  done = object()

  def work():
    try:
      for item in iterator:
        value = transform(item)
        while not stop.is_set():
          try:
            items.put((True, value), timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      items.put((True, done))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      items.put((False, e))

  thread = threading.Thread(target=work, daemon=True, name="vdm-prefetch")
  thread.start()
  try:
    while True:
      ok, value = items.get()
      if not ok:
        raise value
      if value is done:
        return
      yield value
  finally:
    stop.set()
    thread.join()  # its put() gives up within 0.1 s once stop is set

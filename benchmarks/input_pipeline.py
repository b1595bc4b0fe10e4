"""How fast the host delivers training batches, epoch by epoch, as JSON: the rate a device must not outrun.

    python benchmarks/input_pipeline.py                                   # the embedded MNIST digits
    python benchmarks/input_pipeline.py --dataset=cifar10 --data_dir=DIR --batch_size=128 --epochs=3

Batches come as training takes them (``vdm.input_pipeline.train_batches``
behind its ``prefetch`` thread, the whole global batch as one process on
one host reads it), images/s per epoch of the training split. A TFDS split
is decoded from its ArrayRecord files in the first epoch and, up to
``vdm.input_pipeline.TFDS_CACHE_BYTES`` decoded, read from memory after.
One record per epoch.
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from vdm import input_pipeline  # noqa: E402

_DATASET = flags.DEFINE_string("dataset", "mnist5k", "config.data.dataset: mnist5k, npz:…, folder:…, a TFDS name.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "config.data.data_dir (TFDS).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Global batch.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Epochs timed, each on its own.")
_AUGMENT = flags.DEFINE_bool("augment", False, "Also the dihedral augmentation (config.data.augment).")
_CACHE = flags.DEFINE_integer("tfds_cache_bytes", None, "vdm.input_pipeline.TFDS_CACHE_BYTES for this run "
                              "(0: every read decodes, as before the cache).")


def main(argv):
  del argv
  if _CACHE.value is not None:
    input_pipeline.TFDS_CACHE_BYTES = _CACHE.value
  load_start = time.perf_counter()
  train = input_pipeline.load_dataset(_DATASET.value, _DATA_DIR.value, progress=False)["train"]
  load_s = time.perf_counter() - load_start
  steps = len(train) // _BATCH.value
  if steps < 1:
    raise app.UsageError(f"--batch_size={_BATCH.value}: more than the {len(train)} training images")
  batches = input_pipeline.prefetch(input_pipeline.train_batches(train, _BATCH.value, seed=0,
                                                                 augment_data=_AUGMENT.value))
  try:
    for epoch in range(_EPOCHS.value):
      start = time.perf_counter()
      for _ in range(steps):
        next(batches)
      seconds = time.perf_counter() - start
      common.emit({"benchmark": "input_pipeline", "dataset": _DATASET.value, "train_images": len(train),
                   "image_shape": list(train.image_shape), "batch_size": _BATCH.value, "augment": _AUGMENT.value,
                   "tfds_cache_bytes": input_pipeline.TFDS_CACHE_BYTES, "load_s": load_s, "epoch": epoch,
                   "steps": steps, "seconds": seconds, "images_per_s": steps * _BATCH.value / seconds})
  finally:
    batches.close()


if __name__ == "__main__":
  app.run(main)

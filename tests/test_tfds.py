"""TFDS sources: CIFAR-10 prepared offline through its real builder, then read and trained on.

TensorFlow is needed to prepare (it comes with the ``tfds`` extra that CI
installs); reading the prepared ArrayRecord files is tested too.
"""

import io
import os
import tarfile

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed: pip install -e '.[tfds]'")

from configs import cifar10  # noqa: E402
from vdm import input_pipeline, training  # noqa: E402

LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10_binary(path, per_batch=6, num_test=10, seed=0):
  """``cifar-10-binary.tar.gz`` in the official layout: records of 1 label byte + 3072 CHW bytes."""
  rng = np.random.default_rng(seed)
  files, images, classes = {}, {"train": [], "test": []}, {"train": [], "test": []}
  for name, n, split in [(f"data_batch_{i}.bin", per_batch, "train") for i in range(1, 6)] + [
      ("test_batch.bin", num_test, "test")]:
    labels = rng.integers(0, 10, (n, 1)).astype(np.uint8)
    chw = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
    files[name] = np.concatenate([labels, chw.reshape(n, -1)], axis=1).tobytes()
    images[split].append(chw.transpose(0, 2, 3, 1))
    classes[split].append(labels[:, 0])
  files["batches.meta.txt"] = ("\n".join(LABELS) + "\n").encode()
  with tarfile.open(path, "w:gz") as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return ({k: np.concatenate(v) for k, v in images.items()}, {k: np.concatenate(v) for k, v in classes.items()})


def _as_set(images):
  return sorted(x.tobytes() for x in images)


@pytest.fixture(scope="module")
def prepared_cifar10(tmp_path_factory):
  """CIFAR-10 prepared by TFDS's own builder from a generated archive in the manual dir."""
  pytest.importorskip("tensorflow", reason="preparing a TFDS dataset needs TensorFlow (the tfds extra)")
  data_dir = tmp_path_factory.mktemp("tfds")
  manual = data_dir / "downloads" / "manual"  # where vdm tells TFDS to look for hand-downloaded files
  manual.mkdir(parents=True)
  expected, labels = write_cifar10_binary(manual / "cifar-10-binary.tar.gz")
  # Test only: our archive is not the real one, so skip TFDS's registered-checksum comparison.
  dm = tfds.download.DownloadManager
  original = dm._register_or_validate_checksums
  dm._register_or_validate_checksums = lambda self, url, url_info, path: self._recorded_url_infos.update(
      {url: url_info})
  try:
    data = input_pipeline.load_dataset("cifar10", str(data_dir))
  finally:
    dm._register_or_validate_checksums = original
  return data_dir, data, expected, labels


def test_prepared_cifar10_has_the_archives_images_and_labels(prepared_cifar10):
  _, data, expected, labels = prepared_cifar10
  assert len(data["train"]) == 30 and len(data["test"]) == 10
  assert data["train"].image_shape == (32, 32, 3) and data["train"].images.dtype == np.uint8
  for split in ("train", "test"):
    got = data[split].images[np.arange(len(data[split]))]
    assert _as_set(got) == _as_set(expected[split])  # TFDS stores its own order; the images are exact
    label_of = {x.tobytes(): int(c) for x, c in zip(expected[split], labels[split])}
    assert [label_of[x.tobytes()] for x in got] == data[split].labels[np.arange(len(got))].tolist()
    assert data[split].label_count() == 10  # from the dataset's metadata, not the labels seen


def test_reading_again_needs_no_preparation_and_indexes_like_an_array(prepared_cifar10, monkeypatch):
  data_dir, _, expected, _ = prepared_cifar10
  monkeypatch.setattr(input_pipeline, "tensorflow_available", lambda: False)  # reading must not need it
  monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
  data = input_pipeline.load_dataset("cifar10")
  images = data["test"].images
  np.testing.assert_array_equal(images[np.array([[3, 1], [0, 2]])][1, 0], images[np.array([0])][0])
  assert data["test"].max_value() <= 255
  seen = np.concatenate([b[m > 0] for b, m in input_pipeline.eval_batches(data["test"], 4)])
  assert _as_set(seen) == _as_set(expected["test"])  # every example once, padding masked


def test_a_small_split_is_decoded_once_and_read_from_memory_after(prepared_cifar10, monkeypatch):
  data_dir, _, _, _ = prepared_cifar10
  monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
  monkeypatch.setattr(input_pipeline, "TFDS_CACHE_BYTES", 0)  # every read decodes
  uncached = input_pipeline.load_dataset("cifar10")["train"]
  monkeypatch.setattr(input_pipeline, "TFDS_CACHE_BYTES", 2 ** 30)
  cached = input_pipeline.load_dataset("cifar10")["train"]
  records = cached.images._records
  reads = []
  original = records.source.__getitems__
  monkeypatch.setattr(records.source, "__getitems__", lambda keys: reads.append(list(keys)) or original(keys))
  for idx in (np.array([5, 3, 5]), np.array([[3, 7], [29, 0]]), np.arange(30)[::-1], np.array([7, 29])):
    np.testing.assert_array_equal(cached.images[idx], uncached.images[idx])  # the same arrays, any index shape
    np.testing.assert_array_equal(cached.labels[idx], uncached.labels[idx])
  # Images and labels of a batch are decoded together, each example once: then no more reads.
  assert reads == [[3, 5], [0, 7, 29], [i for i in range(30) if i not in (0, 3, 5, 7, 29)]]
  assert uncached.images._values is None and cached.images._values.nbytes == 30 * 32 * 32 * 3


def test_two_training_steps_with_the_cifar10_config(prepared_cifar10, tmp_path):
  data_dir, _, _, _ = prepared_cifar10
  config = cifar10.get_config()
  config.data.data_dir = str(data_dir)
  config.model.network.channels, config.model.network.num_blocks, config.model.network.fourier_exponents = 8, 1, (6,)
  config.training.num_steps, config.training.batch_size, config.training.log_every = 2, 4, 1
  config.training.checkpoint_every = 2
  config.eval.batch_size, config.eval.num_samples = 8, 0
  record = training.train_and_evaluate(config, str(tmp_path), progress=False)
  assert record["step"] == 2 and record["num_examples"] == 10 and np.isfinite(record["bpd"])
  assert os.path.isdir(tmp_path / "checkpoints" / "2")


def test_unprepared_dataset_without_tensorflow_says_what_to_install(tmp_path, monkeypatch):
  monkeypatch.setattr(input_pipeline, "tensorflow_available", lambda: False)
  with pytest.raises(input_pipeline.DataError, match=r"not prepared in .*needs TensorFlow: pip install -e '\.\[tfds\]'"):
    input_pipeline.load_dataset("fashion_mnist", str(tmp_path))


def test_failed_download_says_where_to_put_the_files(tmp_path, monkeypatch):
  pytest.importorskip("tensorflow", reason="preparing a TFDS dataset needs TensorFlow (the tfds extra)")

  def offline(self, *args, **kwargs):
    raise ConnectionError("no route to host")
  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", offline)
  manual = os.path.join(str(tmp_path), "downloads", "manual")
  with pytest.raises(input_pipeline.DataError, match=f"could not download .*no route to host.*{manual}"):
    input_pipeline.load_dataset("cifar10", str(tmp_path))


def test_unknown_tfds_name(tmp_path):
  with pytest.raises(input_pipeline.DataError, match="unknown dataset 'imagenet7'"):
    input_pipeline.load_dataset("imagenet7", str(tmp_path))


def test_reading_a_prepared_dataset_never_imports_tensorflow(prepared_cifar10):
  import subprocess
  import sys
  data_dir, _, _, _ = prepared_cifar10
  code = ("import sys; from vdm import input_pipeline; "
          f"d = input_pipeline.load_dataset('cifar10', {str(data_dir)!r}); "
          "x = d['train'].images[[0, 5, 7]]; print(x.shape, 'tensorflow' in sys.modules)")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == "(3, 32, 32, 3) False"

"""Data: the embedded MNIST split, resumable order, sharding, eval coverage."""

import numpy as np
import pytest

from vdm import input_pipeline


def _split(n, shape=(2, 2, 1)):
  images = np.zeros((n,) + shape, np.uint8)
  images[:, 0, 0, 0] = np.arange(n)  # each image names its index
  return input_pipeline.Split(images)


def test_embedded_mnist_is_the_stratified_split():
  data = input_pipeline.load_dataset("mnist5k")
  assert data["train"].images.shape == (4500, 28, 28, 1) and data["test"].images.shape == (500, 28, 28, 1)
  assert data["train"].images.dtype == np.uint8 and data["train"].images.max() == 255
  with np.load(input_pipeline._EMBEDDED) as f:
    assert np.all(np.bincount(f["train_labels"]) == 450) and np.all(np.bincount(f["test_labels"]) == 50)
  flat = lambda a: {x.tobytes() for x in a}  # noqa: E731
  assert not flat(data["train"].images) & flat(data["test"].images)


def test_every_epoch_is_a_permutation_and_resume_continues_exactly():
  split = _split(10)
  it = input_pipeline.train_batches(split, 4, seed=3)
  seen = np.concatenate([next(it)[0, :, 0, 0, 0] for _ in range(5)])  # 20 = two epochs
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
  assert list(seen[:10]) != list(seen[10:])  # reshuffled
  resumed = input_pipeline.train_batches(split, 4, seed=3, start_step=3)
  np.testing.assert_array_equal(next(resumed)[0, :, 0, 0, 0], seen[12:16])
  stacked = input_pipeline.train_batches(split, 4, seed=3, steps_per_call=2)
  np.testing.assert_array_equal(next(stacked)[:, :, 0, 0, 0].ravel(), seen[:8])


def test_processes_get_disjoint_complete_parts_of_the_global_batch():
  split = _split(12)
  whole = next(input_pipeline.train_batches(split, 6, seed=0))[0, :, 0, 0, 0]
  parts = [next(input_pipeline.train_batches(split, 6, seed=0, process_index=p, process_count=3))[0, :, 0, 0, 0]
           for p in range(3)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize("n,batch", [(10, 4), (8, 4), (3, 8)])
def test_eval_batches_visit_every_example_once(n, batch):
  seen = []
  for images, mask in input_pipeline.eval_batches(_split(n), batch):
    assert len(images) == batch
    seen.extend(images[mask > 0, 0, 0, 0])
  assert sorted(seen) == list(range(n))


def test_npz_source_and_its_errors(tmp_path):
  path = tmp_path / "d.npz"
  np.savez(path, train=np.zeros((5, 8, 8), np.uint8), test=np.zeros((2, 8, 8), np.uint8))
  data = input_pipeline.load_dataset(f"npz:{path}")
  assert data["train"].images.shape == (5, 8, 8, 1)
  np.savez(path, train=np.zeros((5, 8, 8), np.float32), test=np.zeros((2, 8, 8), np.uint8))
  with pytest.raises(input_pipeline.DataError, match="expected a non-empty uint8 array"):
    input_pipeline.load_dataset(f"npz:{path}")
  np.savez(path, train=np.zeros((5, 8, 8), np.uint8))
  with pytest.raises(input_pipeline.DataError, match=r"lacks arrays \['test'\]"):
    input_pipeline.load_dataset(f"npz:{path}")
  with pytest.raises(FileNotFoundError, match="no file"):
    input_pipeline.load_dataset(f"npz:{tmp_path}/missing.npz")
  with pytest.raises(input_pipeline.DataError, match="unknown dataset 'imagenet7'"):
    input_pipeline.load_dataset("imagenet7")

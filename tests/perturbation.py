"""Parameters moved off their initialisation, for tests of gradients and of equal functions."""

import jax
import numpy as np


def perturbed(params, seed=0, scale=0.05, dtype=np.float32):
  """``params`` plus Gaussian noise of ``scale``, as host arrays.

  Off the initialisation (whose zero output convolutions stop every gradient
  inside the network). Drawn by numpy: no small device programs to compile
  for each leaf's shape.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: (np.asarray(p) + scale * rng.standard_normal(p.shape)).astype(dtype), params)

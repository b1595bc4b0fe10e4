"""What the reconstruction term costs inside the loss + gradient.

    python benchmarks/loss_terms.py --config=configs/mnist.py --image_shape=28,28,1 --batch_size=32
    python benchmarks/loss_terms.py --config=configs/cifar10.py --image_shape=32,32,3 --batch_size=8

The paper's decoder is a softmax over the V values of every pixel, a
``[B, H, W, C, V]`` expression. This times the jitted loss + gradient of the
whole model with that term and with it replaced by zeros, alternating the two
so machine noise hits both alike, and the term alone (forward + its gradient
with respect to γ_0). Prints one JSON object and appends it to
benchmarks/results.jsonl.
"""

import os
import statistics
import sys
import time
from unittest import mock

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from vdm import config as config_lib  # noqa: E402
from vdm import losses  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch.")
_SHAPE = flags.DEFINE_string("image_shape", "28,28,1", "H,W,C.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls of each variant.")
flags.mark_flag_as_required("config")


def _loss_and_grad(model, params, x, key):
  def loss(p):
    return model.apply(p, x, key, train=False)["loss"].mean()
  return jax.jit(jax.value_and_grad(loss))


def _time(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def main(argv):
  del argv
  config = _CONFIG.value
  shape = (_BATCH.value,) + tuple(int(s) for s in _SHAPE.value.split(","))
  model = config_lib.build_model(config)
  x = jnp.asarray(np.random.default_rng(0).integers(0, config.model.vocab_size, shape), jnp.int32)
  key = jax.random.key(0)
  params = jax.jit(model.init)(jax.random.key(1), x, key)
  with_term = _loss_and_grad(model, params, x, key)
  zeros = lambda x, eps_0, gamma_0, vocab_size=256: 0.0 * gamma_0 * jnp.ones(x.shape[0])  # noqa: E731
  with mock.patch.object(losses, "reconstruction_loss", zeros):
    without = _loss_and_grad(model, params, x, key)
    _time(without, params)  # compile while patched
  _time(with_term, params)
  alone = jax.jit(jax.value_and_grad(
      lambda g, e: losses.reconstruction_loss(x, e, g, config.model.vocab_size).mean()))
  eps_0 = jax.random.normal(key, shape)
  gamma_0 = jnp.float32(config.model.schedule.gamma_min)
  _time(alone, gamma_0, eps_0)
  a, b, c = [], [], []
  for _ in range(_REPEATS.value):
    a.append(_time(with_term, params))
    b.append(_time(without, params))
    c.append(_time(alone, gamma_0, eps_0))
  full, rest, term = (1e3 * statistics.median(t) for t in (a, b, c))
  record = {"benchmark": "loss_terms", "batch_size": shape[0], "image_shape": list(shape[1:]),
            "channels": config.model.network.channels, "num_blocks": config.model.network.num_blocks,
            "decoder": config.model.decoder, "vocab_size": config.model.vocab_size,
            "loss_grad_ms": full, "loss_grad_without_recon_ms": rest, "recon_alone_ms": term,
            "recon_share_of_loss_grad": (full - rest) / full, "recon_alone_share": term / full,
            "device": jax.devices()[0].device_kind, "jax": jax.__version__}
  common.emit(record)


if __name__ == "__main__":
  app.run(main)

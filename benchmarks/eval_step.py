"""Evaluation throughput: compile time and images/s of the jitted eval step (the negative ELBO per example).

    python benchmarks/eval_step.py --config=configs/mnist.py --image_shape=28,28,1 --batch_size=250
    python benchmarks/eval_step.py --config=configs/cifar10.py --image_shape=32,32,3 --batch_size=16

Runs on all devices (the batch is sharded); random weights, whose values do
not change the speed. Prints one JSON object and appends it to
benchmarks/results.jsonl.
"""

import os
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from vdm import config as config_lib  # noqa: E402
from vdm import evaluation, sharding  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global eval batch (default: the config's eval.batch_size).")
_SHAPE = flags.DEFINE_string("image_shape", "28,28,1", "H,W,C.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls after warm-up.")
flags.mark_flag_as_required("config")


def main(argv):
  del argv
  config = _CONFIG.value
  config_lib.validate(config)
  batch = sharding.round_up(_BATCH.value or config.eval.batch_size)
  shape = tuple(int(s) for s in _SHAPE.value.split(","))
  mesh = sharding.make_mesh()
  model = config_lib.build_model(config, for_eval=True)  # as evaluation runs it (eval.full_precision)
  images = np.random.default_rng(0).integers(0, config.model.vocab_size, (batch,) + shape).astype(np.uint8)
  params = jax.jit(model.init)(jax.random.key(0), images[:1], jax.random.key(1))["params"]
  step = evaluation.make_eval_step(model, mesh)
  data = sharding.to_global(images, sharding.batch_sharding(mesh))
  key = jax.random.key(2)
  t0 = time.perf_counter()
  compiled = step.lower(params, data, key).compile()
  t1 = time.perf_counter()
  jax.block_until_ready(compiled(params, data, key))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, data, key))
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  record = {"benchmark": "eval_step", "batch_size": batch, "image_shape": list(shape),
            "channels": config.model.network.channels, "num_blocks": config.model.network.num_blocks,
            "scan_blocks": config.model.network.scan_blocks, "dtype": np.dtype(model.network.dtype).name,
            "matmul_precision": model.network.matmul_precision,
            "trace_and_compile_s": t1 - t0, "step_ms_median": 1e3 * median,
            "step_ms_spread": 1e3 * (max(times) - min(times)), "images_per_s": batch / median,
            "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(), "jax": jax.__version__}
  common.emit(record)


if __name__ == "__main__":
  app.run(main)

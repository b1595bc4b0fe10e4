"""Train-step speed: first-call time (trace, compile, first run) and steady step time.

    python benchmarks/train_step.py --config=configs/mnist.py
    python benchmarks/train_step.py --config=configs/cifar10.py --batch_size=8 --image_shape=32,32,3
    XLA_FLAGS=--xla_force_host_platform_device_count=8 NPROC=16 python benchmarks/train_step.py --config=configs/mnist.py

Prints one JSON object per run and appends it to benchmarks/results.jsonl.
"""

import json
import os
import platform
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from vdm import sharding, training  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch (default: the config's).")
_SHAPE = flags.DEFINE_string("image_shape", "28,28,1", "H,W,C of the synthetic images.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps after warm-up.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Stop after trace and compile (no step is run).")
_OUT = flags.DEFINE_string("results", os.path.join(os.path.dirname(__file__), "results.jsonl"), "Append here.")
flags.mark_flag_as_required("config")


def measure(config, batch_size: int, image_shape, repeats: int, compile_only: bool = False) -> dict:
  config.training.batch_size = batch_size
  model, optimizer, mesh, init = training.setup(config, image_shape)
  state = init()
  train_fn = training.make_train_fn(config, model, optimizer, mesh)
  local = np.random.default_rng(0).integers(0, 256, (1, batch_size) + tuple(image_shape)).astype(np.uint8)
  batch = sharding.to_global(local, sharding.batch_sharding(mesh, 1))
  t0 = time.perf_counter()
  lowered = train_fn.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  base = {"benchmark": "train_step", "batch_size": batch_size, "image_shape": list(image_shape),
          "channels": config.model.channels, "num_blocks": config.model.num_blocks,
          "scan_blocks": config.model.scan_blocks, "remat": config.model.remat, "dtype": config.model.dtype,
          "trace_s": t1 - t0, "compile_s": t2 - t1, "device": jax.devices()[0].device_kind,
          "num_devices": jax.device_count(), "host": platform.node(), "jax": jax.__version__}
  if compile_only:
    return base
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  t3 = time.perf_counter()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  median = statistics.median(times)
  return {**base, "params": params, "first_run_s": t3 - t2, "first_call_s": t3 - t0,
          "step_ms_median": 1e3 * median, "step_ms_spread": 1e3 * (max(times) - min(times)),
          "images_per_s": batch_size / median}


def main(argv):
  del argv
  config = _CONFIG.value
  shape = tuple(int(s) for s in _SHAPE.value.split(","))
  result = measure(config, _BATCH.value or config.training.batch_size, shape, _REPEATS.value,
                   _COMPILE_ONLY.value)
  line = json.dumps(result)
  print(line)
  with open(_OUT.value, "a") as f:
    f.write(line + "\n")


if __name__ == "__main__":
  app.run(main)

"""Train-step speed: first-call time (trace, compile, first run) and steady step time.

    python benchmarks/train_step.py --config=configs/mnist.py
    python benchmarks/train_step.py --config=configs/cifar10.py --batch_size=8 --image_shape=32,32,3
    XLA_FLAGS=--xla_force_host_platform_device_count=8 NPROC=16 python benchmarks/train_step.py --config=configs/mnist.py

Side by side in one process (variants alternate, so machine noise hits all):

    python benchmarks/train_step.py --config=configs/cifar10.py --batch_size=8 --image_shape=32,32,3 \
        --sweep=model.scan_blocks=False,True --repeats=3
    python benchmarks/train_step.py --config=configs/cifar10.py --batch_size=8 --image_shape=32,32,3 \
        --sweep=model.remat=False,True --compile_only

Each variant reports trace, compile and first-run seconds, the median step
and its spread, images/s, XLA's memory analysis of the compiled step
(``temp_bytes`` = activations and scratch; ``argument_bytes`` = state and
batch) and, on GPUs, the device's peak bytes in use. With ``--sweep`` a last
line gives each variant's figures as ratios to the first. Prints one JSON
object per line and appends them to benchmarks/results.jsonl.
"""

import ast
import copy
import json
import os
import platform
import resource
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
_SWEEP = flags.DEFINE_string("sweep", "", "FIELD=V1,V2,…: measure each value of one config field, side by side.")
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
  memory = compiled.memory_analysis()
  base = {"benchmark": "train_step", "batch_size": batch_size, "image_shape": list(image_shape),
          "channels": config.model.channels, "num_blocks": config.model.num_blocks,
          "scan_blocks": config.model.scan_blocks, "remat": config.model.remat, "dtype": config.model.dtype,
          "conv_grad": config.model.conv_grad, "matmul_precision": config.model.matmul_precision,
          "trace_s": t1 - t0, "compile_s": t2 - t1, "device": jax.devices()[0].device_kind,
          "num_devices": jax.device_count(), "host": platform.node(), "jax": jax.__version__,
          "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
          "argument_bytes": getattr(memory, "argument_size_in_bytes", None)}
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
  stats = jax.devices()[0].memory_stats() or {}
  return {**base, "params": params, "first_run_s": t3 - t2, "first_call_s": t3 - t0,
          "step_ms_median": 1e3 * median, "step_ms_spread": 1e3 * (max(times) - min(times)),
          "images_per_s": batch_size / median, "peak_device_bytes": stats.get("peak_bytes_in_use"),
          "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _parse_sweep(sweep: str) -> tuple[str, list]:
  field, _, values = sweep.partition("=")
  if not field or not values:
    raise app.UsageError(f"--sweep: expected FIELD=V1,V2,…, got {sweep!r}")
  return field, [ast.literal_eval(v) if v[:1].isdigit() or v in ("True", "False", "None") else v
                 for v in values.split(",")]


def _set(config, field: str, value) -> None:
  *parents, leaf = field.split(".")
  node = config
  for name in parents:
    node = node[name]
  if leaf not in node:
    raise app.UsageError(f"--sweep: the config has no field {field!r}")
  node[leaf] = value


def main(argv):
  del argv
  config = _CONFIG.value
  shape = tuple(int(s) for s in _SHAPE.value.split(","))
  batch = _BATCH.value or config.training.batch_size
  variants = [(None, None)]
  if _SWEEP.value:
    field, values = _parse_sweep(_SWEEP.value)
    variants = [(field, v) for v in values]
  results = []
  for field, value in variants:
    variant = copy.deepcopy(config)
    if field:
      _set(variant, field, value)
    result = measure(variant, batch, shape, _REPEATS.value, _COMPILE_ONLY.value)
    if field:
      result["sweep"] = {field: value}
    results.append(result)
    _emit(result)
  if len(results) > 1:
    keys = ("trace_s", "compile_s", "first_run_s", "first_call_s", "step_ms_median", "temp_bytes",
            "peak_device_bytes")
    first = results[0]
    _emit({"benchmark": "train_step_ratios", "field": variants[0][0], "baseline": variants[0][1],
           "ratios": {str(v): {k: r[k] / first[k] for k in keys if r.get(k) and first.get(k)}
                      for (_, v), r in zip(variants, results)},
           "trace_plus_compile_ratio": {str(v): (r["trace_s"] + r["compile_s"]) /
                                        (first["trace_s"] + first["compile_s"])
                                        for (_, v), r in zip(variants, results)}})


def _emit(record: dict) -> None:
  line = json.dumps(record)
  print(line, flush=True)
  with open(_OUT.value, "a") as f:
    f.write(line + "\n")


if __name__ == "__main__":
  app.run(main)

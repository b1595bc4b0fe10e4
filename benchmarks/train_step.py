"""Train-step speed: first-call time (trace, compile, first run) and steady step time.

    python benchmarks/train_step.py --config=configs/mnist.py
    python benchmarks/train_step.py --config=configs/cifar10.py --batch_size=8 --image_shape=32,32,3
    XLA_FLAGS=--xla_force_host_platform_device_count=8 NPROC=16 python benchmarks/train_step.py --config=configs/mnist.py

Side by side in one process, one variant after the other:

    python benchmarks/train_step.py --config=configs/cifar10.py --batch_size=8 --image_shape=32,32,3 \
        --sweep=model.network.scan_blocks=False,True --repeats=3
    python benchmarks/train_step.py --config=configs/cifar10.py --batch_size=8 --image_shape=32,32,3 \
        --sweep=execution.remat_policy=convs,full --compile_only
    python benchmarks/train_step.py --config=configs/cifar10.py --batch_size=8 --image_shape=32,32,3 \
        --variant=model.network.scan_blocks=False,execution.conv_grad=xla --variant=model.network.scan_blocks=True --repeats=3

Each variant reports trace, compile and first-run seconds, the median step
and its spread, images/s, XLA's memory analysis of the compiled step
(``temp_bytes`` = activations and scratch; ``argument_bytes`` = state and
batch) and, on GPUs, the device's peak bytes in use. With several variants a last
line gives each variant's figures as ratios to the first. Prints one JSON
object per line and appends them to benchmarks/results.jsonl.

With ``--compilation_cache=DIR`` (as ``train.py`` keeps its compiled programs)
each record says whether its step was compiled (``"miss"``, and kept) or
loaded (``"hit"``): run the same command twice for a warm first call.
"""

import copy
import os
import platform
import resource
import statistics
import sys
import time
import traceback

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common, flops, profile  # noqa: E402
from vdm import config as config_lib  # noqa: E402
from vdm import compilation_cache, dropout, sharding, train_step, training  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch (default: the config's).")
_SHAPE = flags.DEFINE_string("image_shape", "28,28,1", "H,W,C of the synthetic images.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps after warm-up.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Stop after trace and compile (no step is run).")
_SWEEP = flags.DEFINE_string("sweep", "", "FIELD=V1,V2,…: measure each value of one config field, side by side.")
_VARIANT = flags.DEFINE_multi_string("variant", [], "FIELD=V[,FIELD=V…]: one variant to measure (repeat the flag); "
                                     "the first is the baseline of the ratios.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "The device's peak TFLOP/s for the model FLOP utilisation (MFU); "
                           "default: benchmarks/flops.py's table for the device and precision (none for CPUs).")
_PROFILE = flags.DEFINE_string("profile", "", "DIR: after the timings, trace 3 steps of each variant and report "
                                "where the device time goes (by XLA op, kernel, JAX source, kind); the raw "
                                "traces and the compiled HLO text saved in DIR.")
_CACHE = flags.DEFINE_string("compilation_cache", "", "DIR: keep compiled steps there and load them when there "
                             "(JAX's persistent compilation cache, as train.py's --compilation_cache); "
                             "default: JAX's settings as they are.")
flags.mark_flag_as_required("config")


class _CacheUse:
  """Whether the compilations in its ``with`` block used the persistent compilation cache: ``result`` is
  None (not used), "hit" (a program loaded) or "miss" (compiled)."""
  _EVENTS = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
             "/jax/compilation_cache/cache_hits": "hits"}

  def __enter__(self):
    self.counts = {"requests": 0, "hits": 0}
    jax.monitoring.register_event_listener(self._listen)
    return self

  def _listen(self, event: str, **kwargs) -> None:
    if event in self._EVENTS:
      self.counts[self._EVENTS[event]] += 1

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_listener(self._listen)

  @property
  def result(self):
    kept = (getattr(jax.config, "jax_enable_compilation_cache", True)  # without a folder JAX asks anyway
            and getattr(jax.config, "jax_compilation_cache_dir", None))
    return None if not (kept and self.counts["requests"]) else "hit" if self.counts["hits"] else "miss"


def measure(config, batch_size: int, image_shape, repeats: int, compile_only: bool = False,
            profile_to: str = "") -> dict:
  config.training.batch_size = batch_size
  # execution.group_norm="auto" first runs the Pallas kernels against plain JAX on a GPU (once a process,
  # then cached): a user's first step waits for it too, so its seconds are recorded beside the first call.
  config_lib.validate(config)
  t_check = time.perf_counter()
  group_norm_kernel = "xla" if config_lib.group_norm_launch(config) == "xla" else "pallas"
  group_norm_check_s = time.perf_counter() - t_check
  model, optimizer, mesh, init = training.setup(config, image_shape)
  state = init()
  train_fn = train_step.make_train_fn(config, model, optimizer, mesh)
  local = np.random.default_rng(0).integers(0, 256, (1, batch_size) + tuple(image_shape)).astype(np.uint8)
  batch = sharding.to_global(local, sharding.batch_sharding(mesh, 1))
  t0 = time.perf_counter()
  lowered = train_fn.lower(state, batch)
  t1 = time.perf_counter()
  with _CacheUse() as cache:
    compiled = lowered.compile()
  t2 = time.perf_counter()
  memory = compiled.memory_analysis()
  base = {"benchmark": "train_step", "batch_size": batch_size, "image_shape": list(image_shape),
          "channels": config.model.network.channels, "num_blocks": config.model.network.num_blocks,
          "scan_blocks": config.model.network.scan_blocks, "remat": config.execution.remat,
          "remat_policy": config.execution.remat_policy, "dtype": config_lib.resolve_dtype(config.execution.dtype),
          "conv_grad": config_lib.resolve_conv_grad(config.execution.conv_grad, config.model.network.scan_blocks), "matmul_precision": config.execution.matmul_precision,
          "trace_s": t1 - t0, "compile_s": t2 - t1, "compilation_cache": cache.result,
          "device": jax.devices()[0].device_kind,
          "num_devices": jax.device_count(), "host": platform.node(), "jax": jax.__version__,
          "dropout_mask_kernel": dropout.kernel_enabled(),
          # "auto" fields as resolved here: the norms' kernels and the blocks per loop iteration
          "group_norm_kernel": group_norm_kernel, "group_norm_check_s": group_norm_check_s,
          "blocks_per_iteration": config_lib.resolve_scan_unroll(config),
          "skip_projection": config_lib.resolve_skip_projection(config.execution.skip_projection),
          "attention": config_lib.resolve_attention(config.execution.attention),
          "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
          "argument_bytes": getattr(memory, "argument_size_in_bytes", None)}
  if compile_only:
    return {**base, "flops_per_step": model_flops(config, batch)}
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  t3 = time.perf_counter()
  # The same first step for every variant (same seed, batch, dropout draws): how it computes should barely
  # move these, so rows that differ in more than rounding flag a wrong variant.
  first_step = {"first_step_bpd": float(metrics["train/bpd"]),
                "first_step_grad_norm": float(metrics["train/grad_norm"])}
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  traced = None
  if profile_to:
    def run_step():
      nonlocal state, metrics
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
    traced = profile.trace(run_step, steps=3, keep=profile_to, hlo=compiled.as_text())
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  step_flops = model_flops(config, batch)  # after the timings: it traces the model again
  median = statistics.median(times)
  stats = jax.devices()[0].memory_stats() or {}
  kind = flops.matmul_kind(base["dtype"], config.execution.matmul_precision, jax.default_backend())
  peak = _PEAK.value or flops.peak_tflops(jax.devices()[0].device_kind, kind)
  return {**base, "flops_per_step": step_flops, "params": params, "first_run_s": t3 - t2, "first_call_s": t3 - t0,
          "step_ms_median": 1e3 * median, "step_ms_spread": 1e3 * (max(times) - min(times)),
          "images_per_s": batch_size / median, "peak_device_bytes": stats.get("peak_bytes_in_use"),
          "achieved_tflops": step_flops / median / 1e12,
          "peak_tflops": peak, "peak_kind": kind, "mfu": step_flops / median / 1e12 / peak if peak else None,
          "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **first_step,
          **({"profile": traced} if traced else {})}


def model_flops(config, batch) -> float:
  """Matrix FLOPs of one train step without rematerialisation, counted from its jaxpr.

  The same on every backend (XLA's cost analysis is missing on GPUs and
  counts a loop body once); recomputation (remat) is not model work, so this
  figure is the same for every variant of a model.
  """
  plain = copy.deepcopy(config)
  plain.execution.remat, plain.execution.conv_grad = False, "xla"
  model, optimizer, mesh, init = training.setup(plain, batch.shape[2:])
  return flops.count(train_step.make_train_fn(plain, model, optimizer, mesh), jax.eval_shape(init), batch)


def main(argv):
  del argv
  if _CACHE.value:
    compilation_cache.enable(_CACHE.value)
  config = _CONFIG.value
  shape = tuple(int(s) for s in _SHAPE.value.split(","))
  batch = _BATCH.value or config.training.batch_size
  variants = common.variants(_SWEEP.value, _VARIANT.value)
  results = []
  for index, fields in enumerate(variants):
    variant = copy.deepcopy(config)
    for field, value in fields.items():
      common.set_field(variant, field, value)
    profile_to = os.path.join(_PROFILE.value, f"train_step_{index}.xplane.pb.gz") if _PROFILE.value else ""
    try:
      result = measure(variant, batch, shape, _REPEATS.value, _COMPILE_ONLY.value, profile_to)
    except Exception as error:  # noqa: BLE001  out of memory, a kernel that fails to lower: record it, go on
      first_line = (str(error).strip().splitlines() or [""])[0][:300]
      out_of_memory = "RESOURCE_EXHAUSTED" in str(error)
      result = {"benchmark": "train_step", "batch_size": batch, "image_shape": list(shape),
                "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                "error": ("out of device memory: " if out_of_memory else f"{type(error).__name__}: ") + first_line}
      traceback.print_exc()
    result["variant"] = fields
    results.append(result)
    common.emit(result)
  if all("error" in r for r in results):
    sys.exit(1)  # nothing measured
  measured = [(f, r) for f, r in zip(variants, results) if "error" not in r]
  if len(measured) > 1:
    variants, results = zip(*measured)
    keys = ("trace_s", "compile_s", "first_run_s", "first_call_s", "step_ms_median", "temp_bytes",
            "peak_device_bytes")
    first = results[0]
    name = lambda fields: ",".join(f"{k}={v}" for k, v in fields.items())  # noqa: E731
    common.emit({"benchmark": "train_step_ratios", "baseline": name(variants[0]),
           "ratios": {name(f): {k: r[k] / first[k] for k in keys if r.get(k) and first.get(k)}
                      for f, r in zip(variants, results)},
           "trace_plus_compile_ratio": {name(f): (r["trace_s"] + r["compile_s"]) /
                                        (first["trace_s"] + first["compile_s"])
                                        for f, r in zip(variants, results)}})




if __name__ == "__main__":
  app.run(main)

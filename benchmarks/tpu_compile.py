"""The train step as a TPU slice would run it, compiled on a machine without one: memory per chip, and cost.

    pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"   # libtpu; no TPU needed
    python benchmarks/tpu_compile.py --config=configs/cifar10.py --target=v5e-8
    python benchmarks/tpu_compile.py --config=configs/cifar10.py --target=v5e-1 --batch_size=128,256
    python benchmarks/tpu_compile.py --config=configs/cifar10.py --target=v5e-1 --step=sample
    python benchmarks/tpu_compile.py --config=configs/cifar10.py --target=v6e-8 \
        --variant=execution.dropout_rng=packed --variant=execution.dropout_rng=rbg

libtpu compiles for a TPU slice it is only told about (deviceless
ahead-of-time compilation: ``jax.experimental.topologies``), with the
compiler and memory planning of the TPU itself. So where no TPU is lent
this answers: does the step compile for a TPU at all; how much of each
chip's HBM it takes (XLA's memory analysis: the state and batch it is
given, its outputs beyond those updated in place, its temporaries),
against the chip's published HBM (``fits``: compiled without a device,
XLA does not stop at that limit: the CIFAR-10 step at batch 256 compiled
for one v5e chip to 21.8 GiB of its 16); and what XLA's TPU cost model
estimates its kernels cost (``cost_model_cycles``: each kernel's
``estimated_cycles`` times its launches, loop bodies times their trip
count). The cycles are the compiler's estimate, not a timing: compare
variants by them (the last line's ratios), not devices.

The ``"auto"`` execution fields resolve as on a TPU (bf16 blocks, XLA's
norms, attention and convolution gradient, matmul skip projections;
``scan_unroll=0``: no loops). One JSON record per variant and batch.
"""

import copy
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs JAX; the TPU is only a compilation target
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # libtpu: no TPU VM's metadata server to ask
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # a second process (a test, a benchmark) may hold it

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import compiled as compiled_lib  # noqa: E402

# name: (libtpu topology, its options, devices JAX sees, each device's HBM in GiB as published).
TARGETS = {
    "v4-8": ("v4:2x2x1", {"chip_config_name": "megacore"}, 4, 32),
    "v5e-1": ("v5e:1x1", {"chips_per_host_bounds": (1, 1, 1)}, 1, 16),
    "v5e-4": ("v5e:2x2", {}, 4, 16),
    "v5e-8": ("v5e:2x4", {}, 8, 16),
    "v5p-8": ("v5p:2x2x1", {}, 4, 95),
    "v6e-1": ("v6e:1x1", {"chips_per_host_bounds": (1, 1, 1)}, 1, 32),
    "v6e-8": ("v6e:2x4", {}, 8, 32),
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_TARGET = flags.DEFINE_enum("target", "v5e-8", sorted(TARGETS), "The TPU slice compiled for.")
_STEP = flags.DEFINE_enum("step", "train", ["train", "sample"], "The train step, or one step of the ancestral "
                          "sampler's loop (a forward pass and the update; the figures are per sampling step).")
_BATCH = flags.DEFINE_list("batch_size", ["128"], "Global batch(es), split over the slice's devices.")
_SHAPE = flags.DEFINE_string("image_shape", "32,32,3", "H,W,C of the images.")
_SWEEP = flags.DEFINE_string("sweep", "", "FIELD=V1,V2,…: each value of one config field, side by side.")
_VARIANT = flags.DEFINE_multi_string("variant", [], "FIELD=V[,FIELD=V…]: one variant (repeat the flag).")
_TOP = flags.DEFINE_integer("top", 8, "Kernel families listed per variant (by estimated cycles).")
_SAVE = flags.DEFINE_string("save_hlo", "", "DIR: write each compiled step's HLO text there.")
flags.mark_flag_as_required("config")

def target_mesh(target: str) -> jax.sharding.Mesh:
  """A mesh of a TPU slice's devices that need not be here (one ``data`` axis, as training's)."""
  from jax.experimental import topologies  # noqa: PLC0415
  name, options, expected, _ = TARGETS[target]
  try:
    devices = topologies.get_topology_desc(name, platform="tpu", **options).devices
  except Exception as error:  # no libtpu: JAX raises several kinds
    raise app.UsageError(f"compiling for a TPU needs libtpu (no TPU): pip install \"jax[tpu]=={jax.__version__}\" "
                         f"({str(error).splitlines()[0]})") from error
  if len(devices) != expected:
    raise app.UsageError(f"--target={target}: libtpu gave {len(devices)} devices for {name!r}, expected {expected}")
  return jax.sharding.Mesh(np.asarray(devices), ("data",))


def main(argv):
  del argv
  mesh = target_mesh(_TARGET.value)
  name, _, devices, hbm_gib = TARGETS[_TARGET.value]
  shape = tuple(int(s) for s in _SHAPE.value.split(","))
  batches = [int(b) for b in _BATCH.value]
  for batch in batches:
    if batch % devices:
      raise app.UsageError(f"--batch_size={batch}: not a multiple of {_TARGET.value}'s {devices} devices")
  variants, results = common.variants(_SWEEP.value, _VARIANT.value), []
  for fields in variants:
    for batch in batches:
      config = copy.deepcopy(_CONFIG.value)
      for field, value in fields.items():
        common.set_field(config, field, value)
      compiled_lib.as_on(config, compiled_lib.ON_TPU)
      result = {"benchmark": "tpu_compile", "step": _STEP.value, "target": _TARGET.value, "topology": name,
                "device_kind": mesh.devices.flat[0].device_kind, "devices": devices, "variant": fields,
                "batch_size": batch, "per_device_batch": batch // devices, "image_shape": list(shape),
                "jax": jax.__version__}
      try:
        compiled, seconds = compiled_lib.compile_step(_STEP.value, config, mesh, batch, shape)
      except Exception as error:  # a lowering or compilation error: recorded, the next variant compiled
        result.update(error=f"{type(error).__name__}: {str(error).splitlines()[0][:500]}")
        common.emit(result)
        continue
      hlo = compiled.as_text()
      if _SAVE.value:
        os.makedirs(_SAVE.value, exist_ok=True)
        with open(os.path.join(_SAVE.value, f"tpu_compile_{_TARGET.value}_{len(results)}.hlo.txt"), "w") as f:
          f.write(hlo)
      found = compiled_lib.kernels(hlo)
      result.update(compile_s=seconds, **compiled_lib.memory(compiled.memory_analysis(), hbm_gib),
                    **compiled_lib.cost(found, _TOP.value))
      results.append(result)
      common.emit(result)
  if not results:
    sys.exit("tpu_compile: nothing compiled (each record above names its error)")
  if len(results) > 1:
    first = results[0]
    def label(r):
      return ",".join([f"{k}={v}" for k, v in r["variant"].items()] + [f"batch={r['batch_size']}"])
    common.emit({"benchmark": "tpu_compile_ratios", "target": _TARGET.value, "baseline": label(first),
                 "cycles_per_image": {label(r): (r["cost_model_cycles"] / r["batch_size"])
                                      / (first["cost_model_cycles"] / first["batch_size"]) for r in results}})


if __name__ == "__main__":
  app.run(main)

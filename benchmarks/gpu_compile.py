"""The train step as a GPU would run it, compiled on a machine without one: its kernels, counted.

    pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"   # the CUDA plugin; no GPU needed
    python benchmarks/gpu_compile.py --config=configs/cifar10.py
    python benchmarks/gpu_compile.py --config=configs/cifar10.py --target=h100 \
        --variant=execution.dropout_rng=threefry --variant=execution.dropout_rng=philox --save_hlo=out/
    python benchmarks/gpu_compile.py --config=configs/cifar10.py --step=sample   # one step of the sampler
    python benchmarks/gpu_compile.py --config=configs/cifar10.py --target=a100   # Ampere (sm_80)
    python benchmarks/gpu_compile.py --config=configs/cifar10.py --registers \
        --variant=execution.group_norm=pallas --variant=execution.group_norm=pallas,execution.pallas_programs=4

XLA compiles for a GPU it is only told about (deviceless ahead-of-time
compilation: ``jax.experimental.topologies`` with a target description of
an H200, H100 or A100), so the program's structure can be studied where no GPU
is lent: how many kernels one step launches, of which kinds, moving how
many bytes. These are the figures a step's memory-bound time follows (on
an H200 a small kernel costs about 2 µs however little it does, and moving
a byte costs 1/4.8 TB/s); compute-bound kernels (convolutions, random
bits) and the device's own copies of loop carries are not timed by it.
Measured on an H200 (docs/performance.md), JAX 0.11.2 launched the same
kernel families in the same numbers as this script finds with JAX 0.10.2
(``input_reduce_fusion``: 2,074 there, 2,110 here; 1,072 and 1,072 of
``loop_multiply_fusion``). Autotuning needs the device, so gemm and
convolution algorithms are XLA's defaults. Configs' ``"auto"`` fields
resolve as on a GPU (bf16 blocks, XLA's convolution gradient).

One JSON record per variant (compile seconds, XLA's temporary bytes,
kernels per step, bytes, by kind and by family, the largest by source;
with ``--registers``, each Pallas kernel's registers a thread and spill
bytes, from ``ptxas -v`` on the PTX that XLA writes: what decides how many
of its programs an SM holds); with several, a last line of ratios.
"""

import copy
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs JAX; the GPU is only a compilation target
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # the CUDA plugin loads without a driver

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import compiled as compiled_lib  # noqa: E402

# XLA's GpuTargetConfig for the devices compiled for (their published figures; dnn/runtime versions of CUDA 12).
_DEVICE = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem_per_core} threads_per_core_limit: 2048 core_count: {cores} fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: {l2} clock_rate_ghz: {clock}
  device_memory_size: {memory} shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""
_HOPPER = dict(cores=132, fpus=128, smem_per_core=233472, smem_optin=232448, l2=52428800, clock=1.98, major=9,
               minor=0)
TARGETS = {"h200": dict(_HOPPER, name="NVIDIA H200", bandwidth=4_800_000_000_000, memory=150_000_000_000),
           "h100": dict(_HOPPER, name="NVIDIA H100 80GB HBM3", bandwidth=3_352_320_000_000, memory=84_929_347_584),
           "a100": dict(name="NVIDIA A100-SXM4-80GB", cores=108, fpus=64, smem_per_core=167936, smem_optin=166912,
                        l2=41943040, clock=1.41, major=8, minor=0, bandwidth=2_039_000_000_000,
                        memory=85_089_976_320)}


def ptx_arch(target: str) -> str:
  """ptxas's name for a target's architecture: "sm_80", or "sm_90a" for Hopper (what XLA compiles for)."""
  t = TARGETS[target]
  return f"sm_{t['major']}{t['minor']}{'a' if t['major'] == 9 else ''}"


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_TARGET = flags.DEFINE_enum("target", "h200", sorted(TARGETS), "The GPU compiled for.")
_STEP = flags.DEFINE_enum("step", "train", ["train", "sample"], "The train step, or one step of the ancestral "
                          "sampler's loop (a forward pass and the update; the figures are per sampling step).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Global batch.")
_DEVICES = flags.DEFINE_integer("devices", 1, "GPUs of one host the batch is split over (the figures are "
                                "one device's).")
_SHAPE = flags.DEFINE_string("image_shape", "32,32,3", "H,W,C of the images.")
_SWEEP = flags.DEFINE_string("sweep", "", "FIELD=V1,V2,…: each value of one config field, side by side.")
_VARIANT = flags.DEFINE_multi_string("variant", [], "FIELD=V[,FIELD=V…]: one variant (repeat the flag); "
                                     "the first is the baseline of the ratios.")
_TOP = flags.DEFINE_integer("top", 12, "Kernel families and sources listed per variant.")
_SAVE = flags.DEFINE_string("save_hlo", "", "DIR: write each variant's compiled HLO text there.")
_REGISTERS = flags.DEFINE_bool("registers", False, "Also each Pallas (Triton) kernel's registers a thread and "
                               "spills: ptxas -v on the PTX XLA writes (ptxas from PATH or the CUDA plugin's "
                               "nvidia-cuda-nvcc).")
flags.mark_flag_as_required("config")


def compile_step(config, mesh, batch_size: int, image_shape, step: str = "train") -> tuple[str, float, Optional[int]]:
  """The compiled train step's (or sampling step's) HLO text for the devices of ``mesh``, the seconds it took
  and XLA's temporary bytes (activations and scratch; None where the memory analysis is missing)."""
  compiled, seconds = compiled_lib.compile_step(step, config, mesh, batch_size, image_shape)
  return compiled.as_text(), seconds, getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)


def target_mesh(target: str, devices: int = 1) -> jax.sharding.Mesh:
  """A mesh of ``devices`` GPUs of one host that need not be here."""
  from jax.experimental import topologies  # noqa: PLC0415
  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=_DEVICE.format(**TARGETS[target]),
                                            topology=f"1x1x{devices}")
  except (NotImplementedError, RuntimeError) as error:
    raise app.UsageError(f"compiling for a GPU needs JAX's CUDA plugin (no GPU): pip install "
                         f"\"jax[cuda12]=={jax.__version__}\" ({str(error).splitlines()[0]})") from error
  return jax.sharding.Mesh(np.asarray(topology.devices), ("data",))


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")


def ptxas_registers(ptxas_output: str, prefixes=("_forward_kernel", "_backward_kernel")) -> dict:
  """``{entry: {"registers": n, "spill_bytes": stores + loads}}`` from ``ptxas -v`` output, for the
  entries (kernels) whose names start with one of ``prefixes`` (the Pallas kernels of vdm/group_norm.py)."""
  found, entry, spills = {}, None, 0
  for line in ptxas_output.splitlines():
    if match := _PTXAS_ENTRY.search(line):
      entry, spills = match.group(1), 0
    elif match := _PTXAS_SPILLS.search(line):
      spills = int(match.group(1)) + int(match.group(2))
    elif (match := _PTXAS_USED.search(line)) and entry and entry.startswith(prefixes):
      found[entry] = {"registers": int(match.group(1)), "spill_bytes": spills}
  return found


def _ptxas() -> str:
  spec = importlib.util.find_spec("nvidia.cuda_nvcc")
  bundled = [os.path.join(p, "bin", "ptxas") for p in (spec.submodule_search_locations if spec else [])]
  found = shutil.which("ptxas") or next((p for p in bundled if os.path.exists(p)), None)
  if not found:
    raise app.UsageError("--registers needs ptxas: on PATH, or pip install nvidia-cuda-nvcc-cu12")
  return found


def _holds_pallas_kernels(path: str) -> bool:
  with open(path) as f:
    return re.search(r"\.entry (_forward|_backward)_kernel", f.read()) is not None


def registers_of(ptx_files: list, arch: str = "sm_90a") -> dict:
  """:func:`ptxas_registers` over PTX files, with the kernels' range: ``{"kernels": {…}, "forward": [min,
  max], "backward": [min, max], "spill_bytes": total}``."""
  kernels_found, ptxas = {}, _ptxas()
  for path in ptx_files:
    out = subprocess.run([ptxas, "-v", "--gpu-name", arch, path, "-o", os.devnull], capture_output=True,
                         text=True, check=False)
    kernels_found.update(ptxas_registers(out.stdout + out.stderr))
  spread = lambda prefix: (lambda r: [min(r), max(r)] if r else None)(  # noqa: E731
      [k["registers"] for name, k in kernels_found.items() if name.startswith(prefix)])
  return {"kernels": dict(sorted(kernels_found.items())), "forward": spread("_forward_kernel"),
          "backward": spread("_backward_kernel"), "spill_bytes": sum(k["spill_bytes"] for k in kernels_found.values())}


def main(argv):
  del argv
  dump = None
  if _REGISTERS.value:  # XLA reads its flags when its first backend starts, below
    dump = tempfile.mkdtemp(prefix="gpu_compile_ptx_")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip()
  if _DEVICES.value < 1 or _BATCH.value % _DEVICES.value:
    raise app.UsageError(f"--batch_size={_BATCH.value}: expected a multiple of --devices={_DEVICES.value}")
  mesh = target_mesh(_TARGET.value, _DEVICES.value)
  shape = tuple(int(s) for s in _SHAPE.value.split(","))
  variants, results = common.variants(_SWEEP.value, _VARIANT.value), []
  for index, fields in enumerate(variants):
    config = copy.deepcopy(_CONFIG.value)
    for field, value in fields.items():
      common.set_field(config, field, value)
    compiled_lib.as_on(config, compiled_lib.ON_GPU)
    before = set(glob.glob(os.path.join(dump, "*.ptx"))) if dump else set()
    hlo, seconds, temp_bytes = compile_step(config, mesh, _BATCH.value, shape, _STEP.value)
    if _SAVE.value:
      os.makedirs(_SAVE.value, exist_ok=True)
      with open(os.path.join(_SAVE.value, f"gpu_compile_{index}.hlo.txt"), "w") as f:
        f.write(hlo)
    result = {"benchmark": "gpu_compile", "step": _STEP.value, "target": TARGETS[_TARGET.value]["name"],
              "devices": _DEVICES.value, "variant": fields,
              "batch_size": _BATCH.value, "image_shape": list(shape), "jax": jax.__version__, "compile_s": seconds,
              "temp_gb": temp_bytes / 1e9 if temp_bytes is not None else None, **compiled_lib.summarize(compiled_lib.kernels(hlo), _TOP.value)}
    if dump:
      ptx = sorted(set(glob.glob(os.path.join(dump, "*.ptx"))) - before)
      result["pallas_registers"] = registers_of([p for p in ptx if _holds_pallas_kernels(p)], ptx_arch(_TARGET.value))
    results.append(result)
    common.emit(result)
  if len(results) > 1:
    name = lambda fields: ",".join(f"{k}={v}" for k, v in fields.items())  # noqa: E731
    common.emit({"benchmark": "gpu_compile_ratios", "baseline": name(variants[0]),
                 "ratios": {name(f): {key: r[key] / results[0][key] for key in ("kernels_per_step", "gb_per_step")}
                            for f, r in zip(variants, results)}})


if __name__ == "__main__":
  app.run(main)

"""FLOPs of a JAX program, counted from its jaxpr: the same figure on every backend.

XLA's ``cost_analysis()`` is missing on some backends (GPUs return None) and
counts a loop body once, not once per iteration. This counts the matrix work
of the traced program instead: every ``dot_general`` and
``conv_general_dilated`` at 2 FLOPs per multiply-add, loop bodies times their
trip count, the larger branch of a ``cond``. Element-wise work (norms,
activations, the optimiser) is left out, as in the usual definition of model
FLOPs for utilisation (MFU); on the paper's CIFAR-10 network it is under 2 %
of XLA's own count (tests/test_benchmarks.py).
"""

import math

import jax
import jax.extend as jex
import numpy as np


def _dot_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval
  out = eqn.outvars[0].aval
  return 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval
  out = eqn.outvars[0].aval
  spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial…)
  per_output = rhs.shape[spec[1]] * math.prod(rhs.shape[d] for d in spec[2:])
  return 2.0 * math.prod(out.shape) * per_output


def jaxpr_flops(jaxpr) -> float:
  """Matrix FLOPs of a (closed) jaxpr, loops unrolled in the count."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
    elif name == "cond":
      total += max(jaxpr_flops(branch) for branch in eqn.params["branches"])
    elif name == "while":  # trip count unknown when tracing: the body once
      total += jaxpr_flops(eqn.params["body_jaxpr"]) + jaxpr_flops(eqn.params["cond_jaxpr"])
    else:  # jit, remat, custom_jvp/vjp calls, shard_map…: the inner program once
      total += sum(jaxpr_flops(inner) for inner in jex.core.jaxprs_in_params(eqn.params))
  return total


def count(fn, *args, **kwargs) -> float:
  """Matrix FLOPs of one call ``fn(*args, **kwargs)``; args may be abstract (``jax.ShapeDtypeStruct``)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))


def xla_flops(compiled_or_lowered) -> "float | None":
  """XLA's own FLOP count of a lowered or compiled program, or None where the backend has none."""
  try:
    cost = compiled_or_lowered.cost_analysis()
  except Exception:  # some backends raise instead of returning None
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(np.asarray(cost["flops"]))


# Dense peak TFLOP/s per chip from the vendors' data sheets, by the matmul
# arithmetic in effect: "float32" (true fp32), "tf32" (fp32 matmuls at JAX's
# default precision on Ampere and later GPUs), "bfloat16" (also fp32 matmuls
# at the default precision on TPUs: one bf16 pass). None: no published
# figure. Matched against ``jax.devices()[0].device_kind`` by substring,
# first match wins.
PEAK_TFLOPS = (
    ("H200", {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4}),
    ("H100 PCIe", {"float32": 51.2, "tf32": 378.0, "bfloat16": 756.0}),
    ("H100", {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4}),
    ("A100", {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0}),
    ("L4", {"float32": 30.3, "tf32": 60.0, "bfloat16": 121.0}),
    ("TPU v6", {"float32": None, "tf32": None, "bfloat16": 918.0}),
    ("TPU v5 lite", {"float32": None, "tf32": None, "bfloat16": 197.0}),
    ("TPU v5", {"float32": None, "tf32": None, "bfloat16": 459.0}),
    ("TPU v4", {"float32": None, "tf32": None, "bfloat16": 275.0}),
)


def matmul_kind(dtype: str, matmul_precision: str, platform: str) -> str:
  """Which peak applies: "bfloat16", "tf32" or "float32"."""
  reduced = matmul_precision in ("default", "bfloat16", "tensorfloat32")
  if dtype == "bfloat16" or matmul_precision == "bfloat16" or (platform == "tpu" and reduced):
    return "bfloat16"
  if platform == "gpu" and reduced:
    return "tf32"
  return "float32"


def peak_tflops(device_kind: str, kind: str) -> "float | None":
  """The table's peak for ``device_kind`` and matmul ``kind``; None for devices it does not list (CPUs)."""
  for name, peaks in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return peaks[kind]
  return None

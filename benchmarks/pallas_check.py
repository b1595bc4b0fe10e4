"""The Pallas GroupNorm–swish kernels on this machine: right, and how fast against XLA's norm.

    python benchmarks/pallas_check.py                    # the paper's CIFAR-10 norms at batch 128
    python benchmarks/pallas_check.py --batch_size=2 --image_shape=8,8 --channels=16 --repeats=0   # a CPU

The tests check ``vdm.group_norm`` in Pallas's interpreter; on a GPU the
same kernels are Triton programs, lowered and compiled another way. This
runs them where they will train, against the function they stand for
written with flax's ``nn.GroupNorm`` (float32 arithmetic on the same
inputs): the value and the gradients of ``x`` (each part), the shift,
``scale`` and ``bias``, for the network's three kinds of norm:

* ``norm_0``: a block's first, ``swish(GroupNorm(x))``;
* ``norm_1``: its second, with the block's conditioning added first and
  its dropout mask applied after (keep probability 0.9);
* ``up_norm_0``: an up block's first, its input and skip as two parts whose
  concatenation is normalised;

in float32 (the first launch) and bfloat16 (as the blocks train on
accelerators; each launch of ``--launches``: by default the config's and
three others); and, first, ``vdm.dropout``'s mask kernel against the
traced mask, bit for bit (``dropout_mask``: the masks must be the same on
every backend). A norm's result is ``ok`` when every output's largest
difference, over the largest magnitude of that output, is within the
dtype's tolerance.

With ``--repeats`` > 0, each bf16 case also times one forward and backward
pass (value and all gradients, one jitted call) against XLA's fusion of the
flax norm, with the bytes either must move at least (inputs read once each
way, outputs written once), as GB/s.

One JSON record per case, dtype and launch, then a summary; exits 1 if a
case is not ok.
"""

import math
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from vdm import dropout, group_norm  # noqa: E402


KEEP_PROB = 0.9
TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2}  # largest difference over the output's largest magnitude
CASES = ("norm_0", "norm_1", "up_norm_0")


def parse_launch(spec: str) -> group_norm.Launch:
  """``"programs=4,num_warps=4,accumulate=elementwise"`` → that :class:`vdm.group_norm.Launch`."""
  fields = {}
  for pair in filter(None, spec.split(",")):
    name, _, value = pair.partition("=")
    fields[name] = value if name == "accumulate" else int(value)
  return group_norm.Launch(**fields)


def inputs(case: str, batch: int, shape: tuple, channels: int, dtype, seed: int = 0) -> dict:
  """The case's arguments: ``parts`` (one or two), ``shift`` (or None), ``scale``, ``bias``, ``keep`` (or
  None) and a cotangent ``dy`` of the result, in ``dtype`` (scale and bias float32)."""
  keys = jax.random.split(jax.random.key(seed), 7)
  count = 2 if case == "up_norm_0" else 1
  full = channels * count
  parts = tuple((jax.random.normal(keys[i], (batch, *shape, channels)) * 3.0 + 1.5).astype(dtype)
                for i in range(count))  # a mean far from 0: the variance must not cancel
  return {"parts": parts,
          "shift": jax.random.normal(keys[2], (batch, full)).astype(dtype) if case == "norm_1" else None,
          "scale": 1.0 + 0.3 * jax.random.normal(keys[3], (full,)),
          "bias": 0.3 * jax.random.normal(keys[4], (full,)),
          "keep": jax.random.bernoulli(keys[5], KEEP_PROB, (batch, *shape, full)) if case == "norm_1" else None,
          "dy": jax.random.normal(keys[6], (batch, *shape, full)).astype(dtype)}


def _flax(args: dict, groups: int, dtype):
  """The function the kernels stand for, by flax's GroupNorm, computing in ``dtype``: f(parts, shift, scale,
  bias)."""
  def f(parts, shift, scale, bias):
    x = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    if shift is not None:
      x = x + shift[:, None, None, :]
    y = nn.swish(nn.GroupNorm(num_groups=groups, dtype=dtype).apply({"params": {"scale": scale, "bias": bias}}, x))
    if args["keep"] is not None:
      y = jnp.where(args["keep"], y.astype(jnp.float32) / KEEP_PROB, 0.0)
    return y.astype(dtype)
  return f


def _pallas(args: dict, groups: int, dtype, launch: group_norm.Launch):
  def f(parts, shift, scale, bias):
    return group_norm.group_norm(list(parts), scale, bias, groups, True, dtype=dtype, shift=shift,
                                 keep=args["keep"], keep_prob=KEEP_PROB if args["keep"] is not None else 1.0,
                                 launch=launch)
  return f


def _value_and_grads(f, args: dict):
  """f's value and the gradients of its arguments for the cotangent ``dy``, as one flat dict."""
  primals = (args["parts"], args["shift"], args["scale"], args["bias"])
  y, vjp = jax.vjp(f, *primals)
  dparts, dshift, dscale, dbias = vjp(args["dy"])
  out = {"y": y, "dscale": dscale, "dbias": dbias, **{f"dx{i}": d for i, d in enumerate(dparts)}}
  if dshift is not None:
    out["dshift"] = dshift
  return out


def relative_errors(got: dict, want: dict) -> dict:
  """Per output: the largest |got − want| over the largest |want| (both in float64)."""
  errors = {}
  for name, w in want.items():
    w = np.asarray(w, np.float64)
    g = np.asarray(got[name], np.float64)
    errors[name] = float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30))
  return errors


def _time(fn, args, repeats: int) -> float:
  """Median seconds of ``fn(args)`` (jitted), after a warm-up call."""
  jax.block_until_ready(fn(args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def min_bytes(args: dict) -> int:
  """What a forward and backward pass must move at least: x (and the mask) read each way, y written, dy read,
  dx written."""
  x = sum(p.size * p.dtype.itemsize for p in args["parts"])
  mask = args["keep"].size if args["keep"] is not None else 0  # one byte an activation
  return 2 * (x + mask) + 3 * x  # x, mask twice; y, dy, dx once each (x's size)


def check(case: str, dtype_name: str, launches: list, batch: int, shape: tuple, channels: int, groups: int,
          repeats: int) -> list[dict]:
  """One record per launch: the kernels' value and gradients against flax's, on this backend; timed (bf16)."""
  dtype = jnp.dtype(dtype_name)
  args = inputs(case, batch, shape, channels, dtype)
  if not group_norm.supported([p.shape[-1] for p in args["parts"]], groups):
    raise app.UsageError(f"--groups={groups} of --channels={channels}: the kernels need a power of two of "
                         "groups, each a power of two of channels (vdm.group_norm.supported)")
  # The reference computes in float32 from the same (rounded) inputs; its result is rounded like the kernel's.
  want = jax.jit(lambda a: _value_and_grads(_flax(a, groups, jnp.float32), a))(
      {**args, "parts": tuple(p.astype(jnp.float32) for p in args["parts"]),
       "shift": None if args["shift"] is None else args["shift"].astype(jnp.float32),
       "dy": args["dy"].astype(jnp.float32)})
  want = {k: v.astype(dtype) if k in ("y", "dshift") or k.startswith("dx") else v for k, v in want.items()}
  timed = repeats > 0 and dtype == jnp.bfloat16
  xla_s = _time(jax.jit(lambda a: _value_and_grads(_flax(a, groups, dtype), a)), args, repeats) if timed else None
  records = []
  for launch in launches:
    fn = jax.jit(lambda a, launch=launch: _value_and_grads(_pallas(a, groups, dtype, launch), a))
    errors = relative_errors(fn(args), want)
    record = {"benchmark": "pallas_check", "case": case, "dtype": dtype_name, "backend": jax.default_backend(),
              "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "shape": [batch, *shape, channels * len(args["parts"])], "groups": groups,
              "launch": {"programs": launch.programs, "num_warps": launch.num_warps,
                         "accumulate": launch.accumulate},
              "max_rel_err": errors, "tolerance": TOLERANCE[dtype_name],
              "ok": all(e <= TOLERANCE[dtype_name] for e in errors.values())}
    if timed:
      seconds = _time(fn, args, repeats)
      record.update(fwd_bwd_ms=1e3 * seconds, xla_fwd_bwd_ms=1e3 * xla_s, vs_xla=seconds / xla_s,
                    min_gb=min_bytes(args) / 1e9, gb_per_s=min_bytes(args) / seconds / 1e9,
                    xla_gb_per_s=min_bytes(args) / xla_s / 1e9)
    records.append(record)
  return records


def check_mask(batch: int, shape: tuple, channels: int, repeats: int) -> dict:
  """vdm.dropout's mask kernel (Triton on GPUs, Pallas's interpreter elsewhere) against the traced mask, bit for
  bit, for a block's activations (each example rounded up to whole programs) at keep probability 0.9; timed
  (``repeats`` > 0) against the traced form."""
  calls = -(-math.prod(shape) * channels // (4 * dropout.KERNEL_CALLS)) * dropout.KERNEL_CALLS  # per example
  size = 4 * batch * calls
  k0, k1 = jax.random.key_data(dropout.packed_key(jax.random.key(0))).astype(jnp.uint32)
  threshold = dropout.keep_threshold(0.9)
  interpret = jax.default_backend() != "gpu"
  kernel = jax.jit(lambda k0, k1: dropout.mask_kernel(k0, k1, batch, calls, threshold, interpret=interpret) != 0)
  traced = jax.jit(lambda k0, k1: dropout.traced_mask(k0, k1, (batch, 4, calls), threshold))
  got, want = np.asarray(kernel(k0, k1)), np.asarray(traced(k0, k1))
  record = {"benchmark": "pallas_check", "case": "dropout_mask", "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "jax": jax.__version__, "activations": size,
            "mismatches": int(np.sum(got != want)), "keep_rate": float(got.mean()),
            "ok": bool(np.array_equal(got, want))}
  if repeats > 0:
    both = (k0, k1)
    record.update(kernel_ms=1e3 * _time(lambda a: kernel(*a), both, repeats),
                  traced_ms=1e3 * _time(lambda a: traced(*a), both, repeats))
  return record


def _define_flags() -> None:
  """The command's flags, defined when it runs (importing the module for its checks defines none; other
  benchmarks that tests import define flags of the same names)."""
  flags.DEFINE_integer("batch_size", 128, "Examples.")
  flags.DEFINE_string("image_shape", "32,32", "H,W of the activations.")
  flags.DEFINE_integer("channels", 128, "Channels (an up block's input and skip: this many each).")
  flags.DEFINE_integer("groups", 0, "Norm groups (0: as the network, 32 or fewer, at least 4 channels a group).")
  flags.DEFINE_multi_string(
      "launches", ["programs=4,num_warps=4,accumulate=elementwise", "programs=1,num_warps=8,accumulate=elementwise",
                   "programs=4,num_warps=8,accumulate=rows", "programs=1,num_warps=8,accumulate=rows"],
      "Launches to check, each FIELD=V[,FIELD=V…] of vdm.group_norm.Launch (repeat the flag).")
  flags.DEFINE_integer("repeats", 20, "Timed forward + backward passes per bf16 case (0: none).")


def main(argv):
  del argv
  f = flags.FLAGS
  shape = tuple(int(s) for s in f.image_shape.split(","))
  groups = f.groups or min(32, max(f.channels // 4, 1))
  launches = [parse_launch(spec) for spec in f.launches]
  failed = []
  # The mask first: the device check turns the kernel off for its other parts unless this passes.
  record = check_mask(f.batch_size, shape, f.channels, f.repeats)
  common.emit(record)
  if not record["ok"]:
    failed.append({k: record[k] for k in ("case", "mismatches")})
  for case in CASES:
    for dtype_name in ("float32", "bfloat16"):  # float32 for the arithmetic (first launch); bf16 as trained
      for record in check(case, dtype_name, launches[:1] if dtype_name == "float32" else launches, f.batch_size,
                          shape, f.channels, groups, f.repeats):
        common.emit(record)
        if not record["ok"]:
          failed.append({k: record[k] for k in ("case", "dtype", "launch", "max_rel_err")})
  common.emit({"benchmark": "pallas_check_summary", "backend": jax.default_backend(),
               "device": jax.devices()[0].device_kind, "ok": not failed, "failed": failed})
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)

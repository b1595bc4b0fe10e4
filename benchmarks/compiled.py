"""What a compiled step is made of, read from XLA's HLO text: its kernels, each launch, the bytes it moves.

Shared by ``gpu_compile.py`` and ``tpu_compile.py``, which compile the
train step for a GPU or a TPU slice that need not be here
(:func:`compile_train_step`) and read the result with :func:`kernels`
and :func:`summarize`.
"""

import collections
import re
import time

import jax
import numpy as np

from benchmarks import profile
from vdm import config as config_lib
from vdm import sampling, sharding, train_step, training

_SHAPES = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+) .*\{\s*$")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')  # a TPU kernel's cost, as XLA's cost model estimates it
# Instructions that launch nothing: bookkeeping, control flow (its bodies are walked), in-place views.
_SLICES = {"slice", "dynamic-slice"}  # read only the part of their operand they write
_NO_KERNEL = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call", "conditional",
              "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "copy-start",
              "copy-done", "async-start", "async-done", "get-dimension-size"}


def nbytes(type_text: str) -> int:
  """Bytes of every array in an HLO type (a tuple's summed): ``bf16[2,3]{1,0}`` → 12."""
  return sum(_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d])) for dtype, dims
             in _SHAPES.findall(type_text))


def kernels(hlo_text: str) -> list[dict]:
  """Every kernel of a compiled, scheduled HLO module, once per launch in one execution.

  Each: ``name``, ``family`` (the name without its number), ``launches``
  (loop bodies times their trip count: XLA's ``known_trip_count`` where
  it gives one, as on CPUs and GPUs, else :func:`_trip_count` of the loop's
  condition, as on TPUs), ``out_bytes`` and ``operand_bytes`` (each
  operand's array; in a loop, a stacked array's slice,
  :func:`_per_iteration`, and so is the stacked output of an update in
  place; a slice, or a fusion that is one, reads its output's bytes of each
  operand), ``target`` (a custom call's, e.g. ``__cudnn$convForward``), the
  instruction's ``op_name`` and ``cycles``, a TPU kernel's estimate of its
  own (XLA's cost model, ``estimated_cycles``; 0 elsewhere).
  """
  computations, roots, entry, current = {}, {}, None, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = match.group(2)
      computations[current] = []
      entry = current if match.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current and (match := _INSTRUCTION.match(line)):
      computations[current].append(match.groups())
      if line.lstrip().startswith("ROOT"):
        roots[current] = match.group(3)
  types = {name: text for body in computations.values() for name, text, _, _ in body}
  found = []

  def walk(computation: str, launches: int, trips: int) -> None:
    for name, type_text, op, rest in computations[computation]:
      if op == "while":
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
        n = int(known.group(1)) if known else _trip_count(computations[re.search(r"condition=%([\w.\-]+)",
                                                                                  rest).group(1)])
        walk(re.search(r"body=%([\w.\-]+)", rest).group(1), launches * n, n)
      elif op in ("call", "conditional"):
        for called in re.findall(r"(?:to_apply=|computations=\{|computation=)%([\w.\-]+)", rest):
          walk(called, launches, trips)
      elif op not in _NO_KERNEL:
        operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        source = re.search(r'op_name="([^"]+)"', rest)
        fused = re.search(r"calls=%([\w.\-]+)", rest) if op == "fusion" else None
        out_bytes = _per_iteration(type_text, trips) if re.search("update.slice", name) else nbytes(type_text)
        operand_bytes = [_per_iteration(types.get(o, ""), trips) for o in operands]
        if (roots.get(fused.group(1)) if fused else op) in _SLICES:  # e.g. the parts of an all-reduced buffer
          operand_bytes = [min(b, out_bytes) for b in operand_bytes]
        found.append({"name": name, "family": re.sub(r"[._]\d+$", "", name), "launches": launches,
                      "out_bytes": out_bytes, "operand_bytes": operand_bytes,
                      "target": target.group(1) if target else "", "op_name": source.group(1) if source else "",
                      "cycles": int(cycles.group(1)) if (cycles := _CYCLES.search(rest)) else 0})

  walk(entry, 1, 1)
  return found


def _trip_count(condition: list) -> int:
  """A loop's iterations from its condition's instructions when XLA names no ``known_trip_count``: the
  counter against the one integer constant (``i < n``, from 0, as ``lax.scan`` and ``fori_loop`` lower);
  1 for any other condition."""
  constants = [int(c.group(1)) for _, type_text, op, rest in condition
               if op == "constant" and type_text.startswith("s32[]") and (c := re.match(r"(\d+)\)", rest))]
  less_than = [rest for _, _, op, rest in condition if op == "compare" and "direction=LT" in rest]
  return constants[0] if len(constants) == 1 and len(less_than) == 1 else 1


def _per_iteration(type_text: str, trips: int) -> int:
  """An operand's bytes; inside a loop of ``trips`` iterations, a stacked one (leading dimension ``trips``
  or one more: the scanned blocks' parameters, activations and skips) counts as the one slice read."""
  shape = _SHAPES.search(type_text)
  leading = shape and shape.group(2).split(",")[0]
  if trips > 1 and leading and int(leading) in (trips, trips + 1) and type_text.lstrip()[:1] != "(":
    return nbytes(type_text) // int(leading)
  return nbytes(type_text)


def traffic(kernel: dict) -> int:
  """Bytes one launch reads and writes (operands and output as :func:`kernels` counts them)."""
  return sum(kernel["operand_bytes"]) + kernel["out_bytes"]


def kind(kernel: dict) -> str:
  """profile.py's kinds of work, with custom calls (cuDNN, cuBLAS) as matmul/conv."""
  return "matmul/conv" if kernel["target"] else profile._kind(kernel["family"])


def summarize(found: list[dict], top: int) -> dict:
  """Kernels per step and gigabytes moved: in all, by kind, the ``top`` families and sources."""
  by = {"kind": collections.defaultdict(lambda: [0, 0.0]), "family": collections.defaultdict(lambda: [0, 0.0]),
        "source": collections.defaultdict(lambda: [0, 0.0])}
  for k in found:
    moved = k["launches"] * traffic(k) / 1e9
    for key, value in (("kind", kind(k)), ("family", k["target"] or k["family"]),
                       ("source", profile.source(k["op_name"]) if k["op_name"] else k["name"])):
      by[key][value][0] += k["launches"]
      by[key][value][1] += moved
  table = lambda d, n=None: {name: {"kernels": c, "gb": round(g, 2)} for name, (c, g)  # noqa: E731
                             in sorted(d.items(), key=lambda kv: -kv[1][1])[:n]}
  return {"kernels_per_step": sum(k["launches"] for k in found),
          "gb_per_step": round(sum(k["launches"] * traffic(k) for k in found) / 1e9, 2),
          "by_kind": table(by["kind"]), "top_families": table(by["family"], top),
          "top_sources": table(by["source"], top)}




def compile_train_step(config, mesh, batch_size: int, image_shape) -> tuple[jax.stages.Compiled, float]:
  """The train step compiled for the devices of ``mesh`` (state replicated, ``batch_size`` images split over
  the devices, as training runs it), and the seconds lowering and compiling took."""
  config.training.batch_size = batch_size
  model, optimizer, mesh, init = training.setup(config, image_shape, mesh=mesh)
  rep = sharding.replicated(mesh)
  state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), jax.eval_shape(init))
  batch = jax.ShapeDtypeStruct((1, batch_size) + tuple(image_shape), np.uint8,
                               sharding=sharding.batch_sharding(mesh, 1))
  start = time.perf_counter()
  compiled = train_step.make_train_fn(config, model, optimizer, mesh).lower(state, batch).compile()
  return compiled, time.perf_counter() - start


def compile_sample_step(config, mesh, batch_size: int, image_shape,
                        sampler: str = "ancestral") -> tuple[jax.stages.Compiled, float]:
  """The sampler's loop as :func:`vdm.sampling.generate` compiles it for the devices of ``mesh`` (the
  parameters replicated, ``batch_size`` latents split over the devices), and the seconds it took.

  The loop's bounds are arguments of that program, so its body, one sampling step (a network forward
  pass and the update), is in the HLO once: :func:`kernels` counts it once.
  """
  model = config_lib.build_model(config)
  shape = tuple(image_shape)
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  params = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1,) + shape, np.int32),
                          jax.random.key(1))["params"]
  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=rep), params)
  arrays = (((batch_size,) + shape, np.float32), ((batch_size, 2), np.uint32), ((batch_size,), np.int32))
  z, key_data, labels = (jax.ShapeDtypeStruct(s, t, sharding=data) for s, t in arrays)
  first = jax.ShapeDtypeStruct((), np.int32, sharding=rep)
  _, denoise, _ = sampling._programs(model, shape, 1000, 1000, sampler, 1.0, False, False, mesh)
  start = time.perf_counter()
  compiled = denoise.lower(params, z, key_data, labels, first).compile()
  return compiled, time.perf_counter() - start


def compile_step(step: str, config, mesh, batch_size: int, image_shape) -> tuple[jax.stages.Compiled, float]:
  """:func:`compile_train_step` (``step="train"``) or :func:`compile_sample_step` (``"sample"``)."""
  if step == "sample":
    return compile_sample_step(config, mesh, batch_size, image_shape)
  return compile_train_step(config, mesh, batch_size, image_shape)


# What each "auto" execution field resolves to on one GPU (the Pallas norms as if they passed the check that
# "auto" runs on the device first) and on a TPU: vdm.config's resolve_* and group_norm_launch.
ON_GPU = {"dtype": "bfloat16", "conv_grad": "xla", "skip_projection": "conv", "attention": "cudnn",
          "group_norm": "pallas"}
ON_TPU = {"dtype": "bfloat16", "conv_grad": "xla", "skip_projection": "dense", "attention": "xla", "group_norm": "xla"}


def as_on(config, resolved: dict) -> None:
  """Sets each ``"auto"`` execution field to its value in ``resolved`` (:data:`ON_GPU`, :data:`ON_TPU`), and
  ``scan_unroll=0`` to no loops (as on both); fields set otherwise stay."""
  ex = config.execution
  for field, value in resolved.items():
    if ex[field] == "auto":
      ex[field] = value
  if ex.scan_unroll == 0:
    ex.scan_unroll = config.model.network.num_blocks + 1


GIB = 2 ** 30


def memory(stats, hbm_gib: float) -> dict:
  """A device's share of the compiled step's memory, in GiB: what it is given (state and batch), what it
  returns beyond the buffers it updates in place, its temporaries, their sum, and whether that fits."""
  peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
          + stats.temp_size_in_bytes)
  return {"arguments_gib": stats.argument_size_in_bytes / GIB, "temp_gib": stats.temp_size_in_bytes / GIB,
          "peak_gib": peak / GIB, "hbm_gib": hbm_gib, "fits": peak <= hbm_gib * GIB}


def cost(found: list[dict], top: int) -> dict:
  """XLA's TPU cost model summed over one step: cycles in all and for the ``top`` kernel families."""
  families = {}
  for k in found:
    families[k["family"]] = families.get(k["family"], 0) + k["launches"] * k["cycles"]
  return {"cost_model_cycles": sum(k["launches"] * k["cycles"] for k in found),
          "top_families_by_cycles": dict(sorted(families.items(), key=lambda kv: -kv[1])[:top])}

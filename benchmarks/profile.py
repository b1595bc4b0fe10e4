"""Where a jitted step spends device time: a profiler trace summed by XLA op, kernel, source and kind of work.

    from benchmarks import profile
    summary = profile.trace(lambda: step(), steps=3, keep="out/train.xplane.pb.gz", hlo=compiled.as_text())

Used by ``train_step.py --profile=DIR``; a saved trace can be summarised again:

    python benchmarks/profile.py DIR/train_step_0.xplane.pb.gz --hlo=DIR/train_step_0.hlo.txt.gz --top=40

Reads the trace with ``jax.profiler.ProfileData`` (no TensorFlow or
TensorBoard needed); on GPUs the device plane holds one event per kernel,
named after the XLA instruction that launched it. On CPUs the same is read
from the host threads' XLA ops. With the compiled program's HLO text the
kernels are also attributed to the JAX source that made them (the Flax
module path and primitive of the instruction's ``op_name``).
"""

import collections
import glob
import gzip
import os
import re
import shutil
import tempfile
import time

import jax
from jax.profiler import ProfileData

# Kind of work, from the kernel's (or op's) name; the first pattern that matches wins.
KINDS = (
    ("matmul/conv", r"conv|gemm|xmma|cutlass|cudnn|dot|sm\d+_|wgmma|ampere|hopper|matmul|ynn_fusion|nvjet"),
    ("rng", r"rng|threefry|philox|random"),
    ("reduce", r"reduc"),
    ("copy/transpose", r"copy|transpose|memcpy|memset|bitcast"),
    ("fusion", r"fusion|loop_|input_|elementwise"),
)
_DERIVED_LINES = {"XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Framework Ops", "Framework Name Scope",
                  "Source code", "Launch Stats", "TensorFlow Ops", "TensorFlow Name Scope"}
# Name-stack segments that say nothing about where in the model an op comes from.
# Also the scopes of module methods ("VDM.eps_hat", "network._stack"): the module path says it.
_NOISE = re.compile(r"^(jit\(_.*|while|body|cond|closed_call|branch.*|checkpoint|remat.*|rematted_computation|"
                    r"\w+\.\w+)$")


def _kind(name: str) -> str:
  lowered = name.lower()
  return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), "other")


def _key(name: str) -> str:
  """Kernels are named after their instruction with '.' and '-' as '_' (loop_add_fusion.3 → loop_add_fusion_3)."""
  return re.sub(r"[.\-]", "_", name)


def source(op_name: str) -> str:
  """An instruction's JAX source from its ``op_name``: module path and primitive, transforms unwrapped.

  ``jit(steps)/transpose(jvp(ScoreUNet))/down/resnet/GroupNorm_0/reduce_sum`` →
  ``ScoreUNet/down/resnet/GroupNorm_0/reduce_sum [bwd]``.
  """
  segments = op_name.split("/")[1:]  # without jit(<step>)
  backward = any(s.startswith("transpose(") for s in segments)
  plain = []
  for segment in segments:
    while re.match(r"^(jvp|transpose|vmap|remat|checkpoint)\((.*)\)$", segment):
      segment = re.match(r"^\w+\((.*)\)$", segment).group(1)
    if segment and not _NOISE.match(segment):
      plain.append(segment)
  return "/".join(plain) + (" [bwd]" if backward else "")


def hlo_sources(hlo_text: str) -> dict:
  """Instruction name (as kernels are named) → its :func:`source`."""
  return {_key(match.group(1)): source(match.group(2)) for match in re.finditer(
      r'^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]*)"', hlo_text, re.M)}


def summarize(path: str, steps: int, top: int = 30, hlo_text: str = "") -> dict:
  """Device time per step by XLA op, kernel, kernel family, kind (and JAX source, given the HLO text)."""
  plain = _open(path)
  data = ProfileData.from_file(plain)
  if plain != path:
    os.remove(plain)
  sources = hlo_sources(hlo_text) if hlo_text else {}
  by = {name: collections.Counter() for name in ("op", "kernel", "family", "kind", "source")}
  calls = {name: collections.Counter() for name in ("op", "family", "source")}
  starts, ends = [], []

  def add(op: str, kernel: str, duration_ns: int, kind_of: str):
    family = re.sub(r"(_\d+)+$", "", kernel)[:80]  # loop_add_fusion_12 → loop_add_fusion
    source = sources.get(_key(kernel)) or sources.get(_key(op)) or f"(not in the HLO) {_kind(kind_of)}"
    for name, value in (("op", op), ("kernel", kernel[:120]), ("family", family), ("kind", _kind(kind_of)),
                        ("source", source)):
      by[name][value] += duration_ns
      if name in calls:
        calls[name][value] += 1

  device_planes = [p for p in data.planes if p.name.startswith("/device:") and "CPU" not in p.name]
  line_names = sorted({line.name for p in device_planes for line in p.lines})
  if device_planes:  # GPU/TPU: one event per kernel, on the stream lines (not the derived "XLA Ops" etc.)
    lines = [line for p in device_planes for line in p.lines]
    streams = [line for line in lines if line.name.startswith("Stream")]
    for ev in (ev for line in streams or [x for x in lines if x.name not in _DERIVED_LINES] for ev in line.events):
      op = str(dict(ev.stats).get("hlo_op") or ev.name)
      add(op, ev.name, ev.duration_ns, ev.name + " " + op)
      starts.append(ev.start_ns)
      ends.append(ev.start_ns + ev.duration_ns)
  else:  # CPU: XLA ops on the host's runtime threads
    for ev in (ev for p in data.planes for line in p.lines for ev in line.events):
      op = dict(ev.stats).get("hlo_op")
      if op is not None:
        add(str(op), str(op), ev.duration_ns, str(op))
  busy = sum(by["kind"].values())
  per_step = lambda ns: round(ns / steps / 1e6, 3)  # noqa: E731
  summary = {
      "steps": steps, "device_lines": line_names[:20], "device_busy_ms_per_step": per_step(busy),
      "device_span_ms_per_step": per_step(max(ends) - min(starts)) if starts else None,
      "by_kind_ms_per_step": {k: per_step(v) for k, v in by["kind"].most_common()},
      "by_kind_share": {k: round(v / busy, 4) for k, v in by["kind"].most_common()} if busy else {},
      # [name, ms per step, launches per step]
      "top_ops_ms_per_step": [[k, per_step(v), calls["op"][k] // steps] for k, v in by["op"].most_common(top)],
      "top_kernels_ms_per_step": [[k, per_step(v)] for k, v in by["kernel"].most_common(top)],
      "top_kernel_families": [[k, per_step(v), calls["family"][k] // steps] for k, v in by["family"].most_common(top)],
  }
  if sources:
    summary["top_sources_ms_per_step"] = [[k, per_step(v), calls["source"][k] // steps]
                                          for k, v in by["source"].most_common(top)]
  return summary


def _open(path: str) -> str:
  """A readable ``*.xplane.pb`` for ``path`` (a gzipped one is unpacked to a temporary file)."""
  if not path.endswith(".gz"):
    return path
  fd, plain = tempfile.mkstemp(suffix=".xplane.pb")
  with gzip.open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
    shutil.copyfileobj(src, dst)
  return plain


def trace(run_step, steps: int = 3, keep: str = "", hlo: str = "") -> dict:
  """Profiles ``steps`` calls of ``run_step`` (each must block until done) and summarises them.

  ``keep``: a path to save the raw trace to, gzipped (for TensorBoard/XProf), and the HLO text
  beside it (``….hlo.txt.gz``). ``hlo``: the compiled program's text (``compiled.as_text()``),
  to attribute kernels to the JAX source.
  """
  folder = tempfile.mkdtemp(prefix="vdm-profile-")
  jax.profiler.start_trace(folder)
  t0 = time.perf_counter()
  for _ in range(steps):
    run_step()
  wall = time.perf_counter() - t0
  jax.profiler.stop_trace()
  paths = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    return {"error": f"the profiler wrote no *.xplane.pb under {folder}"}
  summary = {"wall_ms_per_step_while_tracing": round(1e3 * wall / steps, 3),
             **summarize(paths[0], steps, hlo_text=hlo)}
  if keep:
    os.makedirs(os.path.dirname(os.path.abspath(keep)), exist_ok=True)
    with open(paths[0], "rb") as src, gzip.open(keep, "wb") as dst:
      shutil.copyfileobj(src, dst)
    summary["trace_file"] = keep
    if hlo:
      hlo_file = re.sub(r"(\.xplane)?\.pb(\.gz)?$", "", keep) + ".hlo.txt.gz"
      with gzip.open(hlo_file, "wt") as f:
        f.write(hlo)
      summary["hlo_file"] = hlo_file
  shutil.rmtree(folder, ignore_errors=True)
  return summary


if __name__ == "__main__":
  import argparse
  import json

  parser = argparse.ArgumentParser(description="Summarise a saved profiler trace (*.xplane.pb[.gz]).")
  parser.add_argument("trace")
  parser.add_argument("--hlo", default="", help="The program's HLO text (*.hlo.txt[.gz]) to attribute kernels "
                      "to the JAX source.")
  parser.add_argument("--steps", type=int, default=3, help="Steps the trace holds (figures are per step).")
  parser.add_argument("--top", type=int, default=30)
  args = parser.parse_args()
  text = ""
  if args.hlo:
    with (gzip.open(args.hlo, "rt") if args.hlo.endswith(".gz") else open(args.hlo)) as f:
      text = f.read()
  print(json.dumps(summarize(args.trace, args.steps, args.top, text), indent=1))

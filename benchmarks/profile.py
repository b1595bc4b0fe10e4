"""Where a jitted step spends device time: a profiler trace summed by XLA op, kernel and kind of work.

    from benchmarks import profile
    summary = profile.trace(lambda: step(), steps=3, keep="out/train.xplane.pb.gz")

Used by ``train_step.py --profile=DIR``; a saved trace can be summarised again:

    python benchmarks/profile.py DIR/train_step_0.xplane.pb.gz --steps=3 --top=40

 Reads the trace with
``jax.profiler.ProfileData`` (no TensorFlow or TensorBoard needed); on GPUs the
device plane holds one event per kernel, annotated with the XLA op that
launched it. On CPUs the same is read from the host threads' XLA ops.
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
    ("matmul/conv", r"conv|gemm|xmma|cutlass|cudnn|dot|sm\d+_|wgmma|ampere|hopper|matmul|ynn_fusion"),
    ("rng", r"rng|threefry|philox|random"),
    ("reduce", r"reduc"),
    ("copy/transpose", r"copy|transpose|memcpy|memset|bitcast"),
    ("fusion", r"fusion|loop_|input_|elementwise"),
)


_DERIVED_LINES = {"XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Framework Ops", "Framework Name Scope",
                  "Source code", "Launch Stats", "TensorFlow Ops", "TensorFlow Name Scope"}


def _kind(name: str) -> str:
  lowered = name.lower()
  return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), "other")


def summarize(path: str, steps: int, top: int = 30) -> dict:
  """Device time per step, by XLA op, by kernel and by kind, from one ``*.xplane.pb``."""
  plain = _open(path)
  data = ProfileData.from_file(plain)
  if plain != path:
    os.remove(plain)
  device_planes = [p for p in data.planes if p.name.startswith("/device:") and "CPU" not in p.name]
  by_op, by_kernel, by_kind = collections.Counter(), collections.Counter(), collections.Counter()
  count, by_family, family_count = collections.Counter(), collections.Counter(), collections.Counter()
  starts, ends = [], []
  line_names = sorted({line.name for p in device_planes for line in p.lines})
  if device_planes:  # GPU/TPU: one event per kernel, on the stream lines (not the derived "XLA Ops" etc.)
    lines = [line for p in device_planes for line in p.lines]
    streams = [line for line in lines if line.name.startswith("Stream")]
    lines = streams or [line for line in lines if line.name not in _DERIVED_LINES]
    for ev in (ev for line in lines for ev in line.events):
      stats = dict(ev.stats)
      op = str(stats.get("hlo_op") or ev.name)
      by_op[op] += ev.duration_ns
      by_kernel[ev.name] += ev.duration_ns
      family = re.sub(r"(_\d+)+$", "", ev.name)[:80]  # loop_add_fusion_12 → loop_add_fusion
      by_family[family] += ev.duration_ns
      family_count[family] += 1
      by_kind[_kind(ev.name + " " + op)] += ev.duration_ns
      count[op] += 1
      starts.append(ev.start_ns)
      ends.append(ev.start_ns + ev.duration_ns)
  else:  # CPU: XLA ops on the host's runtime threads
    for p in data.planes:
      for line in p.lines:
        for ev in line.events:
          stats = dict(ev.stats)
          if "hlo_op" not in stats:
            continue
          op = str(stats["hlo_op"])
          by_op[op] += ev.duration_ns
          by_kind[_kind(op)] += ev.duration_ns
          count[op] += 1
  busy = sum(by_kind.values())
  per_step = lambda ns: round(ns / steps / 1e6, 3)  # noqa: E731
  return {
      "steps": steps, "device_lines": line_names[:20], "device_busy_ms_per_step": per_step(busy),
      "device_span_ms_per_step": per_step(max(ends) - min(starts)) if starts else None,
      "by_kind_ms_per_step": {k: per_step(v) for k, v in by_kind.most_common()},
      "by_kind_share": {k: round(v / busy, 4) for k, v in by_kind.most_common()} if busy else {},
      "top_ops_ms_per_step": [[op, per_step(ns), count[op] // steps] for op, ns in by_op.most_common(top)],
      "top_kernels_ms_per_step": [[k[:120], per_step(ns)] for k, ns in by_kernel.most_common(top)],
      # [kernel name without its numeric suffix, ms per step, launches per step]
      "top_kernel_families": [[k, per_step(ns), family_count[k] // steps] for k, ns in by_family.most_common(top)],
  }


def _open(path: str) -> str:
  """A readable ``*.xplane.pb`` for ``path`` (a gzipped one is unpacked to a temporary file)."""
  if not path.endswith(".gz"):
    return path
  fd, plain = tempfile.mkstemp(suffix=".xplane.pb")
  with gzip.open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
    shutil.copyfileobj(src, dst)
  return plain


def trace(run_step, steps: int = 3, keep: str = "") -> dict:
  """Profiles ``steps`` calls of ``run_step`` (each must block until done) and summarises them.

  ``keep``: a path to save the raw trace to, gzipped (for TensorBoard/XProf).
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
  summary = {"wall_ms_per_step_while_tracing": round(1e3 * wall / steps, 3), **summarize(paths[0], steps)}
  if keep:
    os.makedirs(os.path.dirname(os.path.abspath(keep)), exist_ok=True)
    with open(paths[0], "rb") as src, gzip.open(keep, "wb") as dst:
      shutil.copyfileobj(src, dst)
    summary["trace_file"] = keep
  shutil.rmtree(folder, ignore_errors=True)
  return summary


if __name__ == "__main__":
  import argparse
  import json

  parser = argparse.ArgumentParser(description="Summarise a saved profiler trace (*.xplane.pb[.gz]).")
  parser.add_argument("trace")
  parser.add_argument("--steps", type=int, default=3, help="Steps the trace holds (figures are per step).")
  parser.add_argument("--top", type=int, default=30)
  args = parser.parse_args()
  print(json.dumps(summarize(args.trace, args.steps, args.top), indent=1))

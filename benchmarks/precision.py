"""What the arithmetic does to a reported bits/dim: one checkpoint evaluated under several precision policies.

    python benchmarks/precision.py --workdir=runs/mnist
    python benchmarks/precision.py --workdir=runs/mnist --policies=float32:highest,float32:default,bfloat16:default

Each policy is ``DTYPE:MATMUL_PRECISION`` for the network (``execution.dtype``,
``execution.matmul_precision``), with ``:float32_residuals`` appended for
``execution.float32_residuals``. Every policy sees the same examples and the same
draws of (t, ε, ε_0), so the differences are paired: each record gives the
split's bpd and its Monte-Carlo standard error, and the mean per-example
difference to the first policy with the standard error of that difference.
On a CPU "default" is exact float32; on A100/H100/H200 GPUs it is TF32, on TPUs
one bf16 pass. Prints one JSON object per policy and appends it to
benchmarks/results.jsonl.
"""

import copy
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import vdm  # noqa: E402
from benchmarks import common  # noqa: E402
from vdm import config as config_lib  # noqa: E402
from vdm import evaluation, input_pipeline  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir or checkpoint folder.")
_POLICIES = flags.DEFINE_list("policies", ["float32:highest", "float32:default", "bfloat16:default"],
                              "DTYPE:MATMUL_PRECISION[:float32_residuals] for the network; the first is the "
                              "reference.")
_DRAWS = flags.DEFINE_integer("draws", 4, "Draws of (t, ε) per example.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Evaluate only the first N examples (0: all).")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  trained = vdm.load(_WORKDIR.value)
  split = input_pipeline.load_dataset(trained.config.data.dataset, trained.config.data.data_dir)[_SPLIT.value]
  key = jax.random.key(123)
  first = None
  for policy in _POLICIES.value:
    dtype, _, precision = policy.partition(":")
    precision, _, residuals = precision.partition(":")
    if residuals not in ("", "float32_residuals"):
      raise app.UsageError(f"--policies: expected DTYPE:MATMUL_PRECISION[:float32_residuals], got {policy!r}")
    config = copy.deepcopy(trained.config)
    config.execution.dtype, config.execution.matmul_precision, config.eval.full_precision = dtype, precision, False
    config.execution.float32_residuals = bool(residuals)
    config_lib.validate(config)
    model = config_lib.build_model(config, for_eval=True)
    result = evaluation.evaluate(model, trained.params, split, batch_size=config.eval.batch_size,
                                 draws=_DRAWS.value, key=key, limit=_LIMIT.value or None,
                                 return_per_example=True)
    per_example = result.pop("per_example")
    record = {"benchmark": "precision", "checkpoint": os.path.abspath(_WORKDIR.value), "step": trained.step,
              "policy": policy, "draws": _DRAWS.value, "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, **result}
    if first is None:
      first = per_example
    else:
      diff = per_example - first
      record.update(bpd_minus_first=float(diff.mean()),
                    bpd_minus_first_stderr=float(diff.std(ddof=1) / np.sqrt(len(diff))),
                    max_abs_example_diff=float(np.abs(diff).max()))
    common.emit(record)


if __name__ == "__main__":
  app.run(main)

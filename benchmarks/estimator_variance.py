"""How noisy is the diffusion-loss estimator? Checkpoints side by side on the same images and draws.

    python benchmarks/estimator_variance.py --workdir=runs/linear --workdir=runs/monotone

For a fixed batch of ``--batch`` images of the split, draws (t, ε) ``--draws``
times (antithetic t as in training, the same draws for every checkpoint) and
evaluates the continuous-time diffusion loss with the EMA parameters. Reports,
in bits/dim: the mean (``bpd_diff``), the standard deviation of one
example's one-draw estimate (``std_per_example``; what a learned schedule
lowers, paper appendix I.2) and of the batch mean (``std_batch``), and each
checkpoint's ratios to the first. One JSON object per checkpoint.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import vdm  # noqa: E402
from benchmarks import common  # noqa: E402
from vdm import input_pipeline, losses  # noqa: E402
from vdm import model as model_lib  # noqa: E402

_WORKDIRS = flags.DEFINE_multi_string("workdir", None, "Training workdirs or checkpoint folders; the first "
                                      "is the one the others are compared with.")
_BATCH = flags.DEFINE_integer("batch", 32, "Images of the split (its first ones).")
_DRAWS = flags.DEFINE_integer("draws", 256, "Independent draws of (t, ε) for that batch.")
_SPLIT = flags.DEFINE_string("split", "test", "Split the images come from.")
flags.mark_flag_as_required("workdir")


def measure(trained, images: np.ndarray, draws: int) -> dict:
  num_dims = int(np.prod(images.shape[1:]))

  @jax.jit
  def loss_diff(key):
    noise = model_lib.draw_noise(key, images.shape, trained.model.antithetic_time_sampling)
    out = trained.model.apply({"params": trained.params}, images, None, noise=noise)
    return losses.bits_per_dim(out["loss_diff"], num_dims)

  values = np.stack([np.asarray(loss_diff(jax.random.fold_in(jax.random.key(0), r))) for r in range(draws)])
  return {"bpd_diff": float(values.mean()), "bpd_diff_stderr": float(values.mean(1).std(ddof=1) / np.sqrt(draws)),
          "std_per_example": float(np.sqrt(values.var(0, ddof=1).mean())),
          "std_batch": float(values.mean(1).std(ddof=1))}


def main(argv):
  del argv
  first = None
  for workdir in _WORKDIRS.value:
    trained = vdm.load(workdir)
    split = input_pipeline.load_dataset(trained.config.data.dataset, trained.config.data.data_dir)[_SPLIT.value]
    images = np.asarray(split.images[:_BATCH.value]).astype(np.int32)
    record = {"benchmark": "estimator_variance", "checkpoint": os.path.abspath(workdir), "step": trained.step,
              "schedule": trained.config.model.schedule.name, "batch": len(images), "draws": _DRAWS.value,
              "device": jax.devices()[0].device_kind, **measure(trained, images, _DRAWS.value)}
    if first is None:
      first = record
    else:
      for k in ("std_per_example", "std_batch"):
        record[f"{k}_ratio_to_first"] = record[k] / first[k]
    common.emit(record)


if __name__ == "__main__":
  app.run(main)

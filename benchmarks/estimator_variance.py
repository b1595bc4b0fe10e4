"""How noisy is the diffusion-loss estimator? Checkpoints side by side on the same images and draws.

    python benchmarks/estimator_variance.py --workdir=runs/linear --workdir=runs/monotone

For a fixed batch of ``--batch`` images of the split, draws (t, ε) ``--draws``
times (antithetic t as in training, the same draws for every checkpoint) and
evaluates the continuous-time diffusion loss with the EMA parameters. Reports,
in bits/dim: the mean (``bpd_diff``), the standard deviation of one
example's one-draw estimate (``std_per_example``; what a learned schedule
lowers, paper appendix I.2) and of the batch mean (``std_batch``), and each
checkpoint's ratios to the first. One JSON object per checkpoint.

With ``--optimum_cells=K`` it also reports how far each schedule is from the
best one for its network. The network sees γ, not t, so another schedule
with the same endpoints is the same model with t drawn from a density q on
[0, 1] and each draw weighted by 1/q; the per-example second moment
E_u[L²/q], summed over examples, is least for q ∝ √E[L² | t]. The loss is
evaluated at the midpoints of K equal cells of t (``--optimum_draws``
draws of ε at each), q is taken constant on each cell, and the record gets
``std_per_example_optimal`` (the one-draw std under that q, which no
schedule of the same network beats by more than the grid's resolution),
``std_per_example_grid`` (the same grid's estimate of today's std) and
``gamma_optimal`` (the γ(t) that draws t from q, at t = 0, 0.1, …, 1).
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
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
_OPTIMUM_CELLS = flags.DEFINE_integer("optimum_cells", 0, "K > 0: also the variance-optimal schedule of each "
                                      "network, from the loss at K equal cells of t (see above); 0 = off.")
_OPTIMUM_DRAWS = flags.DEFINE_integer("optimum_draws", 4, "Draws of ε at each of those cells.")
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


def variance_optimal(values: np.ndarray) -> tuple[float, float, np.ndarray]:
  """Per-example std now and under the variance-optimal density q of t.

  ``values`` ``[K, R, B]``: one-draw estimates at the midpoints of K equal
  cells of t, R draws each, B examples. Returns (std now, std under q, q
  ``[K]`` with mean 1): q_k ∝ √(mean over draws and examples of L²), the
  minimiser of Σ_b E_u[L_b² / q] under ∫q = 1.
  """
  values = np.asarray(values, np.float64)
  mean = values.mean((0, 1))
  second = (values**2).mean(1)  # [K, B]
  q = np.sqrt(second.mean(1))
  q = q / q.mean()
  now = second.mean(0) - mean**2
  best = (second / q[:, None]).mean(0) - mean**2
  return float(np.sqrt(now.mean())), float(np.sqrt(best.mean())), q


def gamma_under(q: np.ndarray, gamma_at_edges: np.ndarray, points: np.ndarray) -> np.ndarray:
  """γ(t) of the schedule that draws the old t from the cell density q: γ_old(F⁻¹(t)), F = ∫ q."""
  cdf = np.concatenate([[0.0], np.cumsum(q) / np.sum(q)])
  return np.interp(np.interp(points, cdf, np.linspace(0.0, 1.0, len(q) + 1)),
                   np.linspace(0.0, 1.0, len(q) + 1), gamma_at_edges)


def measure_optimum(trained, images: np.ndarray, cells: int, draws: int) -> dict:
  num_dims = int(np.prod(images.shape[1:]))

  @jax.jit
  def loss_diff(t, key):
    key_eps, key_eps_0 = jax.random.split(key)
    noise = {"t": jnp.full((len(images),), t, jnp.float32), "eps": jax.random.normal(key_eps, images.shape),
             "eps_0": jax.random.normal(key_eps_0, images.shape)}
    out = trained.model.apply({"params": trained.params}, images, None, noise=noise)
    return losses.bits_per_dim(out["loss_diff"], num_dims)

  mids = (np.arange(cells) + 0.5) / cells
  values = np.stack([np.stack([np.asarray(loss_diff(t, jax.random.fold_in(jax.random.key(1), k * draws + r)))
                               for r in range(draws)]) for k, t in enumerate(mids)])
  now, best, q = variance_optimal(values)
  edges = jnp.linspace(0.0, 1.0, cells + 1)
  gamma = np.asarray(trained.model.apply({"params": trained.params}, edges, method="gamma"))
  return {"std_per_example_grid": now, "std_per_example_optimal": best,
          "gamma_optimal": [round(float(g), 3) for g in gamma_under(q, gamma, np.linspace(0.0, 1.0, 11))],
          "gamma": [round(float(g), 3) for g in np.interp(np.linspace(0.0, 1.0, 11), np.asarray(edges), gamma)],
          "optimum_cells": cells, "optimum_draws": draws}


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
    if _OPTIMUM_CELLS.value > 0:
      record.update(measure_optimum(trained, images, _OPTIMUM_CELLS.value, _OPTIMUM_DRAWS.value))
    if first is None:
      first = record
    else:
      for k in ("std_per_example", "std_batch"):
        record[f"{k}_ratio_to_first"] = record[k] / first[k]
    common.emit(record)


if __name__ == "__main__":
  app.run(main)

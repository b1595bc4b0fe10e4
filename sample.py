"""Sample images from a trained VDM into a PNG grid and an .npz of uint8 arrays.

    python sample.py --workdir=runs/mnist --num_samples=64 --num_steps=1000     # the defaults
    python sample.py --checkpoint=runs/mnist/checkpoints/1500 --sampler=ddim --eta=0 --num_steps=100 --seed=1
    python sample.py --workdir=runs/mnist_cond --labels=all --num_samples=8 --guidance=2   # a conditional model
    python sample.py --workdir=runs/mnist --interpolate=4 --points=8 --num_steps=200  # between test digits
    python sample.py --checkpoint=gs://gresearch/vdm/cifar10/checkpoint-final/checkpoints-0 \
        --config=configs/cifar10.py --output=samples/    # a released google-research/vdm model

A progress bar counts sampler steps; every device JAX sees is used.
"""

import os
import sys

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

import vdm
from vdm import cli, images, input_pipeline, ode, reference, sampling
from vdm.config import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", "", "Training workdir (its latest checkpoint is used).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "A checkpoint folder (overrides --workdir).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "Images to draw.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 1000, "Reverse steps on the grid t_i = i/N.")
_SAMPLER = flags.DEFINE_string("sampler", "ancestral", "ancestral, ddim, or ode (the probability-flow ODE, "
                               "adaptive steps to --rtol/--atol; needs the [ode] extra).")
_ETA = flags.DEFINE_float("eta", 1.0, "DDIM's η in [0, 1]: 0 deterministic, 1 the ancestral variance.")
_RTOL = flags.DEFINE_float("rtol", 1e-5, "--sampler=ode: the solver's relative tolerance.")
_ATOL = flags.DEFINE_float("atol", 1e-5, "--sampler=ode: the solver's absolute tolerance.")
_CLIP = flags.DEFINE_bool("clip_denoised", False, "Clip x̂ to [-1, 1] inside every step.")
_LANGEVIN = flags.DEFINE_integer("langevin_steps", None, "Langevin corrector steps after each step, one network "
                                 "evaluation each (default: the checkpoint config's eval.langevin_steps).")
_LANGEVIN_SNR = flags.DEFINE_float("langevin_snr", None, "The corrector's step size, as a signal-to-noise ratio r "
                                   "(default: the config's eval.langevin_snr).")
_SEED = flags.DEFINE_integer("seed", 0, "Sample k depends only on (seed, k).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Images per compiled batch (default: all at once).")
_LABELS = flags.DEFINE_list("labels", [], "A class-conditional model: the classes to draw, e.g. 0,1,2 (one grid "
                             "row each, --num_samples images per row); 'all' for every class.")
_GUIDANCE = flags.DEFINE_float("guidance", 0.0, "Classifier-free guidance weight w ≥ −1 (with --labels): "
                               "(1 + w) ε̂(z, c) − w ε̂(z, ∅); 0 = the conditional model.")
_INTERPOLATE = flags.DEFINE_integer("interpolate", 0, "Instead of samples: N rows, each from one test image to "
                                    "another (both encoded to z_1 by DDIM η=0 with --num_steps, interpolated on "
                                    "the great circle, decoded).")
_POINTS = flags.DEFINE_integer("points", 8, "--interpolate: images per row, both ends included.")
_OUTPUT = flags.DEFINE_string("output", "", "Output folder (default: <workdir>/samples/; ./samples for a released model).")
_DTYPE = flags.DEFINE_string("dtype", "", "The network's activations while sampling: float32, bfloat16 (about "
                             "1.9x faster on GPUs) or auto (bf16 on GPUs/TPUs); default: as the model trained "
                             "(config.execution.dtype).")
_PRECISION = flags.DEFINE_string("matmul_precision", "", "The network's matmul precision while sampling: default "
                                 "(TF32 on GPUs) or highest; default: as the model trained.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Only for a google-research/vdm checkpoint (which carries no config): the config it "
    "trained with, e.g. configs/cifar10.py.")


def _classes(num_classes: int):
  """--labels as an array of classes (None: unconditional samples); one clear line on bad values."""
  if not _LABELS.value:
    if _GUIDANCE.value != 0.0:
      raise ConfigError("--guidance: needs --labels (guidance contrasts a class with none)")
    if num_classes:
      print(f"note: this model is class-conditional ({num_classes} classes); without --labels it samples "
            "p(x) through its null class, which trained on few examples (--labels=all draws each class)",
            file=sys.stderr)
    return None
  if not num_classes:
    raise ConfigError("--labels: this model is unconditional (config.model.num_classes = 0)")
  if _LABELS.value == ["all"]:
    return np.arange(num_classes, dtype=np.int32)
  try:
    classes = np.array([int(v) for v in _LABELS.value], np.int32)
  except ValueError:
    raise ConfigError(f"--labels: expected integers or 'all', got {','.join(_LABELS.value)!r}") from None
  if classes.min() < 0 or classes.max() >= num_classes:
    raise ConfigError(f"--labels: expected classes in [0, {num_classes - 1}], got {','.join(_LABELS.value)}")
  return classes


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  cli.initialize_distributed()
  cli.enable_compilation_cache()
  with cli.user_errors():
    path = _CHECKPOINT.value or _WORKDIR.value
    if not path:
      raise FileNotFoundError("give --workdir or --checkpoint")
    trained = vdm.load(path, config=_CONFIG.value)
    execution = {k: v for k, v in (("dtype", _DTYPE.value), ("matmul_precision", _PRECISION.value)) if v}
    if execution:
      trained = trained.with_execution(**execution)
    if _INTERPOLATE.value:
      return _write(_interpolate(trained), trained, f"interpolate_step{trained.step}_n{_NUM_STEPS.value}"
                    f"_seed{_SEED.value}", _POINTS.value, None, {})
    classes = _classes(trained.num_classes)
    stats = {}
    labels = None if classes is None else np.repeat(classes, _NUM_SAMPLES.value)
    count = _NUM_SAMPLES.value * (1 if classes is None else len(classes))
    langevin_steps, langevin_snr = trained.langevin(_SAMPLER.value, _LANGEVIN.value, _LANGEVIN_SNR.value)
    samples = trained.sample(jax.random.key(_SEED.value), count, num_steps=_NUM_STEPS.value,
                             sampler=_SAMPLER.value, eta=_ETA.value, clip_denoised=_CLIP.value,
                             batch_size=_BATCH.value or None, progress=True, labels=labels, guidance=_GUIDANCE.value,
                             rtol=_RTOL.value, atol=_ATOL.value, stats=stats, langevin_steps=langevin_steps,
                             langevin_snr=langevin_snr)
  steps = f"n{_NUM_STEPS.value}" if _SAMPLER.value != "ode" else f"tol{_RTOL.value:g}"
  if langevin_steps:
    steps += f"_langevin{langevin_steps}x{langevin_snr:g}"
  name = f"{_SAMPLER.value}_step{trained.step}_{steps}_seed{_SEED.value}"
  if classes is not None:
    name += f"_w{_GUIDANCE.value:g}"
  _write(samples, trained, name, _NUM_SAMPLES.value if classes is not None else 0, labels, stats)


def _interpolate(trained):
  """--interpolate rows of --points images between pairs of test images (chosen by --seed)."""
  if _POINTS.value < 2:
    raise ConfigError(f"--points: expected ≥ 2, got {_POINTS.value}")
  if _INTERPOLATE.value < 0:
    raise ConfigError(f"--interpolate: expected a number of rows ≥ 0, got {_INTERPOLATE.value}")
  test = input_pipeline.load_dataset(trained.config.data.dataset, trained.config.data.data_dir)["test"]
  if len(test) < 2:
    raise ConfigError("--interpolate: the test split needs at least 2 images")
  pick = np.random.default_rng(_SEED.value).choice(len(test), 2 * _INTERPOLATE.value,
                                                   replace=2 * _INTERPOLATE.value > len(test))
  ends = np.asarray(test.images[np.sort(pick)]).reshape((_INTERPOLATE.value, 2) + tuple(trained.image_shape))
  z_1 = trained.encode(ends.reshape((-1,) + tuple(trained.image_shape)), _NUM_STEPS.value,
                       batch_size=_BATCH.value or None).reshape(ends.shape)
  fractions = np.linspace(0.0, 1.0, _POINTS.value)
  path = np.concatenate([np.asarray(sampling.slerp(a, b, fractions)) for a, b in z_1])
  return trained.decode(path, _NUM_STEPS.value, batch_size=_BATCH.value or None)


def _write(samples, trained, name, columns, labels, stats):
  if jax.process_index() != 0:
    return
  if _OUTPUT.value or _WORKDIR.value:
    out = _OUTPUT.value or os.path.join(_WORKDIR.value, "samples")
  elif reference.find(_CHECKPOINT.value) is not None:  # a released model: maybe not a local folder
    out = "samples"
  else:
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(_CHECKPOINT.value))), "samples")
  png = os.path.join(out, name + ".png")
  images.write_png(png, images.grid(samples, columns))
  npz = os.path.join(out, name + ".npz")
  images.write_npz(npz, samples=samples, **({} if labels is None else {"labels": labels}))
  if "solver_steps" in stats:
    steps = stats["solver_steps"]
    print(f"ode: {sum(steps)} solver steps over {len(steps)} batch(es), about {ode.EVALS_PER_STEP} network "
          "evaluations each")
  print(f"wrote {png}\nwrote {npz}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)

"""Sample images from a trained VDM into a PNG grid and an .npz of uint8 arrays.

    python sample.py --workdir=runs/mnist --num_samples=64 --num_steps=1000     # the defaults
    python sample.py --checkpoint=runs/mnist/checkpoints/1500 --sampler=ddim --eta=0 --num_steps=100 --seed=1
    python sample.py --checkpoint=gs://gresearch/vdm/cifar10/checkpoint-final/checkpoints-0 \
        --config=configs/cifar10.py --output=samples/    # a released google-research/vdm model

A progress bar counts sampler steps; every device JAX sees is used.
"""

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import vdm
from vdm import cli, images, reference

_WORKDIR = flags.DEFINE_string("workdir", "", "Training workdir (its latest checkpoint is used).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "A checkpoint folder (overrides --workdir).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "Images to draw.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 1000, "Reverse steps on the grid t_i = i/N.")
_SAMPLER = flags.DEFINE_string("sampler", "ancestral", "ancestral or ddim.")
_ETA = flags.DEFINE_float("eta", 1.0, "DDIM's η in [0, 1]: 0 deterministic, 1 the ancestral variance.")
_CLIP = flags.DEFINE_bool("clip_denoised", False, "Clip x̂ to [-1, 1] inside every step.")
_SEED = flags.DEFINE_integer("seed", 0, "Sample k depends only on (seed, k).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Images per compiled batch (default: all at once).")
_OUTPUT = flags.DEFINE_string("output", "", "Output folder (default: <workdir>/samples/; ./samples for a released model).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Only for a google-research/vdm checkpoint (which carries no config): the config it "
    "trained with, e.g. configs/cifar10.py.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  cli.initialize_distributed()
  with cli.user_errors():
    path = _CHECKPOINT.value or _WORKDIR.value
    if not path:
      raise FileNotFoundError("give --workdir or --checkpoint")
    trained = vdm.load(path, config=_CONFIG.value)
    samples = trained.sample(jax.random.key(_SEED.value), _NUM_SAMPLES.value, num_steps=_NUM_STEPS.value,
                             sampler=_SAMPLER.value, eta=_ETA.value, clip_denoised=_CLIP.value,
                             batch_size=_BATCH.value or None, progress=True)
  if jax.process_index() != 0:
    return
  if _OUTPUT.value or _WORKDIR.value:
    out = _OUTPUT.value or os.path.join(_WORKDIR.value, "samples")
  elif reference.find(_CHECKPOINT.value) is not None:  # a released model: maybe not a local folder
    out = "samples"
  else:
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(_CHECKPOINT.value))), "samples")
  name = f"{_SAMPLER.value}_step{trained.step}_n{_NUM_STEPS.value}_seed{_SEED.value}"
  png = os.path.join(out, name + ".png")
  images.write_png(png, images.grid(samples))
  npz = os.path.join(out, name + ".npz")
  images.write_npz(npz, samples=samples)
  print(f"wrote {png}\nwrote {npz}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)

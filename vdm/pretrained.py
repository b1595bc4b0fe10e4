"""Load a trained VDM from a checkpoint; sample and score images in Python.

    import jax, vdm
    trained = vdm.load("runs/mnist")                 # a workdir or a checkpoint folder
    images = trained.sample(jax.random.key(0), 16, num_steps=250)   # uint8 [16, 28, 28, 1]
    scores = trained.evaluate_bpd(images, jax.random.key(1), draws=4)

    # The paper's released models (google-research/vdm checkpoints), with the config they trained with:
    trained = vdm.load("gs://gresearch/vdm/cifar10/checkpoint-final/checkpoints-0", config="configs/cifar10.py")
"""

import dataclasses
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from vdm import checkpoints, evaluation, input_pipeline, reference, sampling, sharding
from vdm import config as config_lib
from vdm import model as model_lib
from vdm import train_step
from vdm.config import ConfigError


@dataclasses.dataclass
class TrainedVDM:
  """A VDM with its EMA parameters, as saved at ``step``."""
  config: ml_collections.ConfigDict
  params: Any  # the EMA parameters
  step: int
  model: model_lib.VDM
  image_shape: tuple  # (H, W, C)

  def sample(self, key: jax.Array, num_samples: int, *, num_steps: int = 1000,
             sampler: str = "ancestral", eta: float = 1.0, clip_denoised: bool = False,
             batch_size: Optional[int] = None, return_latents: bool = False, decode_draw: bool = False,
             progress: bool = True):
    """Draws uint8 images ``[N, H, W, C]`` (and z_0 if ``return_latents``).

    Sample k depends only on (key, k), whatever ``batch_size`` or the
    number of devices. Every device JAX sees is used (each batch is
    sharded over them; in a multi-process run every process must call).
    ``eta`` is DDIM's (0: deterministic; 1: the ancestral variance); the
    ancestral sampler ignores it. ``progress``: a bar over sampler steps (on stderr).
    The network runs as in training (``config.execution.dtype`` and
    ``matmul_precision``).
    """
    _check_sampling_args(num_samples, num_steps, sampler, eta, batch_size)
    images, latents = sampling.generate(
        self.model, self.params, key, num_samples, self.image_shape, num_steps=num_steps,
        sampler=sampler, eta=eta, clip_denoised=clip_denoised, decode_draw=decode_draw,
        batch_size=batch_size, progress=progress, mesh=sharding.make_mesh())
    images = images.astype(np.uint8)
    return (images, latents) if return_latents else images

  def evaluate_bpd(self, images, key: jax.Array, draws: int = 1, batch_size: int = 256) -> dict:
    """Bits per dimension of your own uint8 images ``[N, H, W, C]`` (or ``[N, H, W]``).

    Returns ``bpd`` (mean), ``bpd_stderr``, the three terms, and
    ``per_example`` (``[N]``, each averaged over ``draws``).
    """
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    if images.shape[1:] != tuple(self.image_shape) or not np.issubdtype(images.dtype, np.integer):
      raise ConfigError(f"images: expected integers [N, {', '.join(map(str, self.image_shape))}], "
                       f"got {images.dtype} {images.shape}")
    if images.min() < 0 or images.max() >= self.model.vocab_size:
      raise ConfigError(f"images: values must lie in [0, {self.model.vocab_size - 1}]")
    split = input_pipeline.Split(images.astype(np.uint8) if self.model.vocab_size <= 256 else images)
    eval_model = config_lib.build_model(self.config, for_eval=True)  # eval.full_precision: float32, "highest"
    # On every device; in a multi-process run every process must call, and each gets every example's result.
    return evaluation.evaluate(eval_model, self.params, split, batch_size=batch_size, draws=draws, key=key,
                               return_per_example=True, mesh=sharding.make_mesh())


def _check_sampling_args(num_samples, num_steps, sampler, eta, batch_size) -> None:
  if num_samples < 1:
    raise ConfigError(f"num_samples: expected ≥ 1, got {num_samples}")
  if num_steps < 1:
    raise ConfigError(f"num_steps: expected ≥ 1, got {num_steps}")
  if sampler not in sampling.SAMPLERS:
    raise ConfigError(f"sampler: unknown sampler {sampler!r}; expected one of {sampling.SAMPLERS}")
  if not 0.0 <= eta <= 1.0:
    raise ConfigError(f"eta: expected a value in [0, 1], got {eta}")
  if batch_size is not None and batch_size < 1:
    raise ConfigError(f"batch_size: expected ≥ 1, got {batch_size}")


def load(path: str, step: Optional[int] = None, *, config=None, image_shape: Optional[tuple] = None) -> TrainedVDM:
  """Loads a workdir's latest checkpoint, the checkpoint folder ``path``, or a released model.

  ``path`` may also be a checkpoint of the 2022 reference code
  (google-research/vdm: its prefix, its ``.flax`` file or their folder;
  local or ``gs://``). Such a checkpoint carries no config: give the one it
  trained with as ``config`` (a ConfigDict or a path such as
  ``"configs/cifar10.py"``), and ``image_shape`` if it is not 32×32 (the
  reference's data). Its EMA parameters are used, as for our checkpoints.
  ``config`` is refused for our own checkpoints, which carry theirs.

  Raises FileNotFoundError when there is no checkpoint there.
  """
  released = reference.find(path)
  if released is not None:
    return _load_reference(path, released, config, image_shape)
  if config is not None:
    raise ConfigError(f"config: {path} is a vdm checkpoint, which carries its own config; give config only "
                      "for google-research/vdm checkpoints")
  directory, found_step = checkpoints.resolve(path)
  step = found_step if step is None else step
  mngr = checkpoints.manager(directory, read_only=True)
  config, metadata = checkpoints.restore_config(mngr, step)
  image_shape = tuple(metadata.get("image_shape", ()))
  if not image_shape:
    raise ConfigError(f"{path}: checkpoint has no image_shape metadata")
  model = config_lib.build_model(config)
  like = train_step.abstract_state(config, image_shape)
  state = checkpoints.restore(mngr, like, step, sharding=sharding.replicated(sharding.make_mesh()))
  return TrainedVDM(config=config, params=state.ema_params, step=int(state.step), model=model,
                    image_shape=image_shape)


def _load_reference(path: str, file, config, image_shape) -> TrainedVDM:
  if config is None:
    raise ConfigError(f"config: {path} is a google-research/vdm checkpoint, which carries no config; give the "
                      "one it trained with, e.g. config='configs/cifar10.py'")
  if isinstance(config, str):
    config = config_lib.from_file(config)
  config_lib.validate(config)
  if image_shape is None:  # the reference's data: CIFAR-10
    image_shape = (32, 32, 3)
  image_shape = tuple(int(n) for n in image_shape)
  params, step = reference.load(file, config, image_shape)
  params = jax.device_put(params, sharding.replicated(sharding.make_mesh()))
  return TrainedVDM(config=config, params=params, step=step, model=config_lib.build_model(config),
                    image_shape=image_shape)

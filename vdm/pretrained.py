"""Load a trained VDM from a checkpoint; sample and score images in Python.

    import jax, vdm
    trained = vdm.load("runs/mnist")                 # a workdir or a checkpoint folder
    images = trained.sample(jax.random.key(0), 16, num_steps=250)   # uint8 [16, 28, 28, 1]
    scores = trained.evaluate_bpd(images, jax.random.key(1), draws=4)

    # The paper's released models (google-research/vdm checkpoints), with the config they trained with:
    trained = vdm.load("gs://gresearch/vdm/cifar10/checkpoint-final/checkpoints-0", config="configs/cifar10.py")
"""

import copy
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
             progress: bool = True, labels=None, guidance: float = 0.0, rtol: float = 1e-5, atol: float = 1e-5,
             stats: Optional[dict] = None, langevin_steps: Optional[int] = None,
             langevin_snr: Optional[float] = None):
    """Draws uint8 images ``[N, H, W, C]`` (and z_0 if ``return_latents``).

    ``sampler="ode"``: the probability-flow ODE (:mod:`vdm.ode`), solved
    with adaptive steps to tolerances ``rtol``/``atol`` (``num_steps`` and
    ``eta`` are then unused); ``stats`` (a dict) receives its
    ``solver_steps`` per batch.

    A class-conditional model (``config.model.num_classes`` > 0) draws image
    k of class ``labels[k]`` (``[N]`` integers; None: unconditional samples),
    with classifier-free guidance weight ``guidance`` (0: the conditional
    model; larger: closer to the class, less diverse).

    Sample k depends only on (key, k), whatever ``batch_size`` or the
    number of devices. Every device JAX sees is used (each batch is
    sharded over them; in a multi-process run every process must call).
    ``eta`` is DDIM's (0: deterministic; 1: the ancestral variance); the
    ancestral sampler ignores it. ``progress``: a bar over sampler steps (on stderr).
    ``langevin_steps``: Langevin corrector steps after each sampler step
    (step size set by ``langevin_snr``; :func:`vdm.sampling.langevin_step`),
    one network evaluation each; None: the config's ``eval.langevin_steps``
    and ``eval.langevin_snr`` (none for ``sampler="ode"``); README, Sample.
    The network runs as in training (``config.execution.dtype`` and
    ``matmul_precision``).
    """
    langevin_steps, langevin_snr = self.langevin(sampler, langevin_steps, langevin_snr)
    _check_sampling_args(num_samples, num_steps, sampler, eta, batch_size, langevin_steps, langevin_snr)
    if not (rtol > 0 and atol > 0):
      raise ConfigError(f"rtol, atol: expected tolerances > 0, got {rtol}, {atol}")
    labels = self._check_labels(labels, num_samples, guidance)
    images, latents = sampling.generate(
        self.model, self.params, key, num_samples, self.image_shape, num_steps=num_steps,
        sampler=sampler, eta=eta, clip_denoised=clip_denoised, decode_draw=decode_draw,
        batch_size=batch_size, progress=progress, mesh=sharding.make_mesh(), labels=labels, guidance=guidance,
        rtol=rtol, atol=atol, stats=stats, langevin_steps=langevin_steps, langevin_snr=langevin_snr)
    images = images.astype(np.uint8)
    return (images, latents) if return_latents else images

  def langevin(self, sampler: str, steps: Optional[int] = None, snr: Optional[float] = None) -> tuple:
    """The corrector :meth:`sample` runs: (steps, snr), each the config's ``eval`` value where None."""
    if steps is None:
      steps = 0 if sampler == "ode" else int(self.config.eval.langevin_steps)
    return steps, float(self.config.eval.langevin_snr if snr is None else snr)

  def encode(self, images, num_steps: int = 1000, *, batch_size: Optional[int] = None, labels=None,
             guidance: float = 0.0) -> np.ndarray:
    """Integer images ``[N, H, W, C]`` (or ``[N, H, W]``) → latents z_1 ``[N, H, W, C]`` float32.

    The deterministic DDIM sampler (η = 0) run forwards from z_0 = α_0 x;
    :meth:`decode` with the same ``num_steps`` maps z_1 back to the images
    (exactly as N → ∞; README: the pixel error at N = 100 and 1,000).
    """
    images = self._check_images(images)
    _check_sampling_args(len(images), num_steps, "ddim", 0.0, batch_size)
    labels = self._check_labels(labels, len(images), guidance)
    return sampling.encode(self.model, self.params, images, num_steps=num_steps, batch_size=batch_size,
                           mesh=sharding.make_mesh(), labels=labels, guidance=guidance)

  def decode(self, latents, num_steps: int = 1000, *, batch_size: Optional[int] = None, labels=None,
             guidance: float = 0.0) -> np.ndarray:
    """Latents z_1 ``[N, H, W, C]`` → uint8 images, by the deterministic DDIM sampler (η = 0)."""
    latents = np.asarray(latents, np.float32)
    if latents.shape[1:] != tuple(self.image_shape):
      raise ConfigError(f"latents: expected [N, {', '.join(map(str, self.image_shape))}], got {latents.shape}")
    _check_sampling_args(len(latents), num_steps, "ddim", 0.0, batch_size)
    labels = self._check_labels(labels, len(latents), guidance)
    return sampling.decode_latents(self.model, self.params, latents, num_steps=num_steps, batch_size=batch_size,
                                   mesh=sharding.make_mesh(), labels=labels,
                                   guidance=guidance).astype(np.uint8)

  def interpolate(self, image_a, image_b, num_points: int = 8, num_steps: int = 1000) -> np.ndarray:
    """``num_points`` uint8 images from ``image_a`` to ``image_b`` (both included, ``[H, W, C]``):
    both are encoded, their latents interpolated on the great circle (:func:`vdm.sampling.slerp`), decoded."""
    if num_points < 2:
      raise ConfigError(f"num_points: expected ≥ 2, got {num_points}")
    z_a, z_b = self.encode(np.stack([np.asarray(image_a), np.asarray(image_b)]), num_steps)
    path = np.asarray(sampling.slerp(z_a, z_b, np.linspace(0.0, 1.0, num_points)))
    return self.decode(path, num_steps)

  def _check_images(self, images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    if images.shape[1:] != tuple(self.image_shape) or not np.issubdtype(images.dtype, np.integer):
      raise ConfigError(f"images: expected integers [N, {', '.join(map(str, self.image_shape))}], "
                       f"got {images.dtype} {images.shape}")
    if images.min() < 0 or images.max() >= self.model.vocab_size:
      raise ConfigError(f"images: values must lie in [0, {self.model.vocab_size - 1}]")
    return images

  def with_execution(self, **fields) -> "TrainedVDM":
    """The same model and parameters, computed another way: new values of ``config.execution`` fields.

    E.g. ``vdm.load(path).with_execution(dtype="bfloat16").sample(...)`` samples with bf16
    activations (1.9× faster on an H100, README: Performance) from a model trained in float32.
    Only the execution fields (dtype, matmul_precision, remat, …) may change: they say how the
    network is computed, not what it is. Evaluation keeps ``config.eval.full_precision``.
    """
    config = copy.deepcopy(self.config)
    for name, value in fields.items():
      if name not in config.execution:
        raise ConfigError(f"execution.{name}: no such field; the execution fields are "
                          f"{', '.join(sorted(config.execution))}")
      config.execution[name] = value
    config_lib.validate(config)
    return dataclasses.replace(self, config=config, model=config_lib.build_model(config))

  @property
  def num_classes(self) -> int:
    """K of a class-conditional model; 0 for an unconditional one."""
    return int(self.model.num_classes)

  def _check_labels(self, labels, count: int, guidance: float = 0.0):
    if labels is None:
      if guidance != 0.0:
        raise ConfigError(f"guidance: expected 0 without labels (it contrasts a class with none), got {guidance}")
      return None
    if not self.num_classes:
      raise ConfigError("labels: this model is unconditional (config.model.num_classes = 0); give no labels")
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
      raise ConfigError(f"labels: expected {count} integers, got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() >= self.num_classes:
      raise ConfigError(f"labels: expected classes in [0, {self.num_classes - 1}], got {labels.min()}…{labels.max()}")
    if not guidance >= -1.0:
      raise ConfigError(f"guidance: expected a weight ≥ −1, got {guidance}")
    return labels.astype(np.int32)

  def evaluate_bpd(self, images, key: jax.Array, draws: int = 1, batch_size: int = 256, labels=None) -> dict:
    """Bits per dimension of your own uint8 images ``[N, H, W, C]`` (or ``[N, H, W]``).

    ``labels`` ``[N]``: a class-conditional model's −log p(x│c); without
    them such a model gives −log p(x) (its null class).

    Returns ``bpd`` (mean), ``bpd_stderr``, the three terms, and
    ``per_example`` (``[N]``, each averaged over ``draws``).
    """
    images = self._check_images(images)
    labels = self._check_labels(labels, len(images))
    split = input_pipeline.Split(images.astype(np.uint8) if self.model.vocab_size <= 256 else images, labels)
    eval_model = config_lib.build_model(self.config, for_eval=True)  # eval.full_precision: float32, "highest"
    # On every device; in a multi-process run every process must call, and each gets every example's result.
    return evaluation.evaluate(eval_model, self.params, split, batch_size=batch_size, draws=draws, key=key,
                               return_per_example=True, mesh=sharding.make_mesh(), labels=labels is not None)


def _check_sampling_args(num_samples, num_steps, sampler, eta, batch_size, langevin_steps=0,
                         langevin_snr=0.1) -> None:
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
  if not (isinstance(langevin_steps, int) and langevin_steps >= 0):
    raise ConfigError(f"langevin_steps: expected an integer ≥ 0, got {langevin_steps!r}")
  if langevin_steps and sampler == "ode":
    raise ConfigError("langevin_steps: the ODE sampler takes no corrector steps; use 'ancestral' or 'ddim'")
  if not langevin_snr > 0:
    raise ConfigError(f"langevin_snr: expected a value > 0, got {langevin_snr}")


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

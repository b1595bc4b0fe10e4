"""Config → objects, in one place: validation, the model, the optimiser.

Every check names the field and what was expected, and runs before any
compilation.
"""

import functools
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vdm import model as model_lib
from vdm import dropout, group_norm, input_pipeline, networks, objectives, schedules

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LR_DECAYS = ("constant", "cosine", "linear")
CONV_GRADS = ("auto", "dot", "xla")
# execution.dropout_rng → JAX's PRNG implementation (see vdm.train_step.make_dropout_key); "packed" is
# vdm.dropout.PACKED: Threefry keys whose masks take 16 bits per activation.
DROPOUT_RNGS = {"threefry": "threefry2x32", "philox": "philox4x32", "rbg": "rbg", "packed": dropout.PACKED}
MATMUL_PRECISIONS = ("highest", "high", "default", "float32", "tensorfloat32", "bfloat16")
GAMMA_PATHS = ("auto",) + model_lib.GAMMA_PATHS  # eval.gamma_path, see resolve_gamma_path


class ConfigError(ValueError):
  """A config field or an argument holds a value the library cannot use."""


# The arguments of vdm.input_pipeline that a config sets, and the fields that set them.
DATA_ARGUMENTS = {"dataset": "config.data.dataset", "augment": "config.data.augment",
                  "vocab_size": "config.model.vocab_size", "num_classes": "config.model.num_classes"}


def names_config_fields(fn):
  """Decorates a function of a config: its data errors name the config field, not the argument."""
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except input_pipeline.DataError as e:
      if e.field not in DATA_ARGUMENTS:
        raise
      raise e.for_field(DATA_ARGUMENTS[e.field]) from e
  return wrapper


def from_file(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file, e.g. ``configs/cifar10.py``, as ``--config=`` loads it.

  A file inside a package folder (``configs/`` has ``__init__.py``) may
  import its siblings (``from configs import base``).
  """
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config: no such file {path!r}")
  folder = os.path.dirname(path)
  root = os.path.dirname(folder) if os.path.isfile(os.path.join(folder, "__init__.py")) else folder
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location(f"_vdm_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config: {path!r} defines no get_config()")
  return module.get_config()


def _check(ok: bool, field: str, expected: str, value) -> None:
  if not ok:
    raise ConfigError(f"config.{field}: expected {expected}, got {value!r}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field that is out of range."""
  m, sched, net, ex = config.model, config.model.schedule, config.model.network, config.execution
  tr, opt, ev = config.training, config.optimizer, config.eval
  _check(isinstance(config.data.augment, bool), "data.augment", "True or False", config.data.augment)
  _check(m.vocab_size >= 2, "model.vocab_size", "an integer ≥ 2", m.vocab_size)
  _check(m.num_diffusion_steps >= 0, "model.num_diffusion_steps", "≥ 0 (0 = continuous time)",
         m.num_diffusion_steps)
  _check(m.decoder in model_lib.DECODERS, "model.decoder", f"one of {model_lib.DECODERS}", m.decoder)
  _check(m.prediction in objectives.PREDICTIONS, "model.prediction", f"one of {objectives.PREDICTIONS}",
         m.prediction)
  _check(m.loss_weighting in objectives.WEIGHTINGS, "model.loss_weighting", f"one of {objectives.WEIGHTINGS}",
         m.loss_weighting)
  _check(isinstance(m.num_classes, int) and m.num_classes >= 0, "model.num_classes",
         "an integer ≥ 0 (0 = unconditional)", m.num_classes)
  _check(0.0 <= m.label_dropout < 1.0, "model.label_dropout", "a rate in [0, 1)", m.label_dropout)
  _check(sched.name in schedules.SCHEDULES, "model.schedule.name", f"one of {tuple(schedules.SCHEDULES)}",
         sched.name)
  _check(sched.gamma_min < sched.gamma_max, "model.schedule.gamma_min",
         f"< model.schedule.gamma_max ({sched.gamma_max})", sched.gamma_min)
  _check(sched.hidden >= 1, "model.schedule.hidden", "a positive integer", sched.hidden)
  _check(isinstance(config.training.minimize_variance, bool), "training.minimize_variance", "True or False",
         config.training.minimize_variance)
  for field in ("channels", "num_blocks"):
    _check(net[field] >= 1, f"model.network.{field}", "a positive integer", net[field])
  _check(isinstance(net.channel_mult, (tuple, list)) and len(net.channel_mult) >= 1
         and all(isinstance(v, int) and v >= 1 for v in net.channel_mult), "model.network.channel_mult",
         "a non-empty tuple of positive integers, e.g. (1,) or (1, 2, 2)", net.channel_mult)
  _check(0.0 <= net.dropout < 1.0, "model.network.dropout", "a rate in [0, 1)", net.dropout)
  _check(isinstance(net.patch_size, int) and net.patch_size >= 1, "model.network.patch_size",
         "a positive integer (1 = no patches)", net.patch_size)
  _check(isinstance(net.input_skip, bool), "model.network.input_skip", "True or False", net.input_skip)
  _check(net.norm_groups >= 0, "model.network.norm_groups", "≥ 0 (0 = automatic)", net.norm_groups)
  _check(not net.norm_groups or net.channels % net.norm_groups == 0, "model.network.norm_groups",
         f"a divisor of model.network.channels ({net.channels})", net.norm_groups)
  _check(ex.dtype in DTYPES or ex.dtype == "auto", "execution.dtype", f"one of {tuple(DTYPES) + ('auto',)}",
         ex.dtype)
  _check(ex.remat_policy in networks.REMAT_POLICIES, "execution.remat_policy",
         f"one of {tuple(networks.REMAT_POLICIES)}", ex.remat_policy)
  _check(ex.conv_grad in CONV_GRADS, "execution.conv_grad", f"one of {CONV_GRADS}", ex.conv_grad)
  _check(ex.dropout_rng in DROPOUT_RNGS, "execution.dropout_rng", f"one of {tuple(DROPOUT_RNGS)}",
         ex.dropout_rng)
  _check(ex.skip_concat in networks.SKIP_CONCATS, "execution.skip_concat", f"one of {networks.SKIP_CONCATS}",
         ex.skip_concat)
  _check(ex.skip_projection in networks.SKIP_PROJECTIONS + ("auto",), "execution.skip_projection",
         f"one of {networks.SKIP_PROJECTIONS + ('auto',)}", ex.skip_projection)
  _check(ex.attention in networks.ATTENTION_KERNELS + ("auto",), "execution.attention",
         f"one of {networks.ATTENTION_KERNELS + ('auto',)}", ex.attention)
  _check(isinstance(ex.float32_residuals, bool), "execution.float32_residuals", "True or False",
         ex.float32_residuals)
  _check(ex.group_norm in group_norm.KERNELS + ("auto",), "execution.group_norm",
         f"one of {group_norm.KERNELS + ('auto',)}", ex.group_norm)
  _check(ex.group_norm != "pallas" or jax.default_backend() != "tpu", "execution.group_norm",
         "'xla' on TPUs (the 'pallas' kernels are written for GPUs' Triton)", ex.group_norm)
  _check(ex.pallas_num_warps in (1, 2, 4, 8, 16, 32), "execution.pallas_num_warps", "1, 2, 4, 8, 16 or 32",
         ex.pallas_num_warps)
  _check(isinstance(ex.pallas_programs, int) and ex.pallas_programs >= 1 and ex.pallas_programs & (
      ex.pallas_programs - 1) == 0, "execution.pallas_programs", "a power of two ≥ 1", ex.pallas_programs)
  _check(ex.pallas_accumulate in group_norm.ACCUMULATE, "execution.pallas_accumulate",
         f"one of {group_norm.ACCUMULATE}", ex.pallas_accumulate)
  _check(isinstance(ex.threefry_gpu_kernel, bool), "execution.threefry_gpu_kernel", "True or False",
         ex.threefry_gpu_kernel)
  _check(isinstance(ex.scan_unroll, int) and ex.scan_unroll >= 0, "execution.scan_unroll",
         "an integer ≥ 0 (1 = one block per loop iteration, 0 = automatic)", ex.scan_unroll)
  _check(ex.matmul_precision in MATMUL_PRECISIONS, "execution.matmul_precision", f"one of {MATMUL_PRECISIONS}",
         ex.matmul_precision)
  for field in ("num_steps", "batch_size", "grad_accum_steps", "steps_per_call", "log_every", "checkpoint_every",
                "checkpoints_to_keep"):
    _check(tr[field] >= 1, f"training.{field}", "a positive integer", tr[field])
  _check(tr.batch_size % tr.grad_accum_steps == 0, "training.batch_size",
         f"a multiple of training.grad_accum_steps ({tr.grad_accum_steps})", tr.batch_size)
  _check(tr.on_nonfinite in ("skip", "stop"), "training.on_nonfinite", "'skip' or 'stop'", tr.on_nonfinite)
  _check(tr.eval_every >= 0, "training.eval_every", "≥ 0 (0 = never)", tr.eval_every)
  _check(tr.importance_bins >= 0, "training.importance_bins", "≥ 0 (0 = off)", tr.importance_bins)
  _check(0.0 <= tr.importance_decay < 1.0, "training.importance_decay", "a decay in [0, 1)", tr.importance_decay)
  _check(0.0 < tr.importance_floor <= 1.0, "training.importance_floor", "a share in (0, 1]", tr.importance_floor)
  _check(not (tr.importance_bins and sched.name == "monotone_net" and tr.minimize_variance),
         "training.importance_bins", "0 with training.minimize_variance (monotone_net learns its interior "
         "from the uniform-t estimator; set one of them off)", tr.importance_bins)
  for field in ("num_steps", "log_every", "eval_every", "checkpoint_every"):
    _check(tr[field] % tr.steps_per_call == 0, f"training.{field}",
           f"a multiple of training.steps_per_call ({tr.steps_per_call})", tr[field])
  _check(opt.learning_rate > 0, "optimizer.learning_rate", "> 0", opt.learning_rate)
  _check(opt.warmup_steps >= 0, "optimizer.warmup_steps", "≥ 0", opt.warmup_steps)
  _check(opt.decay in LR_DECAYS, "optimizer.decay", f"one of {LR_DECAYS}", opt.decay)
  _check(opt.weight_decay >= 0, "optimizer.weight_decay", "≥ 0", opt.weight_decay)
  _check(opt.schedule_lr_scale > 0, "optimizer.schedule_lr_scale", "> 0 (1 = the network's rate)",
         opt.schedule_lr_scale)
  _check(opt.grad_clip_norm >= 0, "optimizer.grad_clip_norm", "≥ 0 (0 = off)", opt.grad_clip_norm)
  _check(0.0 <= opt.ema_rate < 1.0, "optimizer.ema_rate", "a decay in [0, 1)", opt.ema_rate)
  _check(ev.batch_size >= 1, "eval.batch_size", "a positive integer", ev.batch_size)
  _check(ev.draws >= 1, "eval.draws", "a positive integer", ev.draws)
  _check(isinstance(ev.full_precision, bool), "eval.full_precision", "True or False", ev.full_precision)
  _check(ev.num_samples >= 0, "eval.num_samples", "≥ 0", ev.num_samples)
  _check(ev.sample_steps >= 1, "eval.sample_steps", "a positive integer", ev.sample_steps)
  _check(ev.langevin_steps >= 0, "eval.langevin_steps", "an integer ≥ 0 (0 = no corrector)", ev.langevin_steps)
  _check(ev.langevin_snr > 0, "eval.langevin_snr", "> 0", ev.langevin_snr)
  _check(ev.gamma_path in GAMMA_PATHS, "eval.gamma_path", f"one of {GAMMA_PATHS}", ev.gamma_path)
  _check(ev.gamma_path != "linear" or m.num_diffusion_steps == 0, "eval.gamma_path",
         "'auto' or 'schedule' in discrete time (model.num_diffusion_steps > 0: the loss depends on the "
         "schedule's grid)", ev.gamma_path)
  _check(ev.ode.rtol > 0 and ev.ode.atol > 0, "eval.ode.rtol", "tolerances > 0 (eval.ode.rtol and .atol)",
         (ev.ode.rtol, ev.ode.atol))
  _check(ev.ode.max_steps >= 1, "eval.ode.max_steps", "a positive integer", ev.ode.max_steps)
  _check(ev.ode.dequantization in ("uniform", "decoder"), "eval.ode.dequantization", "'uniform' or 'decoder'",
         ev.ode.dequantization)
  _check(ev.ode.examples >= 0, "eval.ode.examples", "≥ 0 (0 = all)", ev.ode.examples)
  _check(ev.guidance >= -1.0, "eval.guidance", "a weight ≥ −1 (0 = the conditional model, −1 = unconditional)",
         ev.guidance)


def check_image_shape(config: ml_collections.ConfigDict, image_shape) -> None:
  """Raises ConfigError if the network cannot take images of ``image_shape`` (H, W, C)."""
  mult, patch = tuple(config.model.network.channel_mult), config.model.network.patch_size
  levels, factor = len(mult), networks.size_divisor(mult, patch)
  on_patches = f" on {patch}×{patch} patches" if patch > 1 else ""
  _check(image_shape[0] % factor == 0 and image_shape[1] % factor == 0, "model.network.channel_mult",
         f"at most as many levels as halvings of the images' {image_shape[0]}×{image_shape[1]} "
         f"({levels} levels{on_patches} need height and width divisible by {factor})", mult)


def build_model(config: ml_collections.ConfigDict, *, for_eval: bool = False,
                forward_mode: bool = False) -> model_lib.VDM:
  """The VDM of ``config.model``, computed as ``config.execution`` says.

  ``config.model.network`` holds :class:`vdm.networks.ScoreUNet`'s own
  arguments. ``for_eval``: the network as evaluation runs it; with
  ``config.eval.full_precision`` that is float32 activations and "highest"
  matmul precision (same parameters, same function up to rounding).
  ``forward_mode``: a network that ``jax.jvp`` can differentiate (XLA's own
  convolution derivatives, norms and attention; the ODE likelihood's divergence needs them).
  """
  m, sched, ex = config.model, config.model.schedule, config.execution
  dtype, precision = ex.dtype, ex.matmul_precision
  if for_eval and config.eval.full_precision:
    dtype, precision = "float32", "highest"
  extra = {"hidden": sched.hidden} if sched.name == "monotone_net" else {}
  schedule = schedules.get_schedule(sched.name, sched.gamma_min, sched.gamma_max, **extra)
  network = dict(m.network.to_dict(), fourier_exponents=tuple(m.network.fourier_exponents),
                 channel_mult=tuple(m.network.channel_mult))
  network = networks.ScoreUNet(
      **network, gamma_min=sched.gamma_min, gamma_max=sched.gamma_max,
      remat=ex.remat, remat_policy=ex.remat_policy, scan_unroll=resolve_scan_unroll(config),
      skip_concat=ex.skip_concat, skip_projection=resolve_skip_projection(ex.skip_projection),
      attention_kernel="xla" if forward_mode else resolve_attention(ex.attention),  # cuDNN's: no forward mode
      group_norm="xla" if forward_mode else group_norm_launch(config),  # the kernels have no forward mode
      dtype=DTYPES[resolve_dtype(dtype)], float32_residuals=ex.float32_residuals,
      conv_grad="xla" if forward_mode else resolve_conv_grad(ex.conv_grad, m.network.scan_blocks),
      matmul_precision=precision,
      num_augmentations=input_pipeline.NUM_AUGMENTATIONS if config.data.augment else 0,
      num_classes=m.num_classes)
  return model_lib.VDM(schedule, network, vocab_size=m.vocab_size,
                       num_steps=m.num_diffusion_steps, prediction=m.prediction, loss_weighting=m.loss_weighting,
                       sigmoid_bias=m.sigmoid_bias,
                       # a weighted loss depends on the interior: then it is what the interior follows
                       minimize_variance=config.training.minimize_variance and m.loss_weighting == "elbo",
                       antithetic_time_sampling=m.antithetic_time_sampling, decoder=m.decoder,
                       num_classes=m.num_classes, label_dropout=m.label_dropout,
                       gamma_path=resolve_gamma_path(config) if for_eval else "schedule")


def group_norm_launch(config: ml_collections.ConfigDict) -> networks.GroupNormKernel:
  """``execution.group_norm`` as the network takes it: "xla", or the Pallas kernels launched as
  ``execution.pallas_num_warps``, ``pallas_programs`` and ``pallas_accumulate`` say.

  "auto": the kernels where :func:`vdm.group_norm.unavailable` finds nothing against them (GPUs, where
  they match the reference; checked once per process), else "xla", saying why on a GPU.
  """
  ex = config.execution
  if ex.group_norm == "xla":
    return "xla"
  launch = group_norm.Launch(num_warps=ex.pallas_num_warps, programs=ex.pallas_programs,
                             accumulate=ex.pallas_accumulate)
  if ex.group_norm == "pallas":
    return launch
  why = group_norm.unavailable(launch)
  if why is None:
    return launch
  if jax.default_backend() == "gpu":
    networks.warn_once(f"execution.group_norm='auto': XLA's GroupNorm, not the Pallas kernels: {why}")
  return "xla"


def resolve_skip_projection(projection: str) -> str:
  """``auto``: the up blocks' projections as 1×1 convolutions on GPUs (compiled for an H200, with the
  additions cuDNN then fuses, the CIFAR-10 step moves 2–4 GB fewer; docs/performance.md), as matmuls
  elsewhere (on CPUs XLA's 1×1 convolutions and their gradients are the slower)."""
  if projection != "auto":
    return projection
  return "conv" if jax.default_backend() == "gpu" else "dense"


def resolve_attention(attention: str) -> str:
  """``auto``: cuDNN's fused attention on GPUs of compute capability 8 or more (Ampere on, as it needs;
  compiled for an H200, the paper's attention block's training traffic falls from 5.6 to 0.5 GB;
  docs/performance.md), XLA's elsewhere."""
  if attention != "auto":
    return attention
  if jax.default_backend() != "gpu":
    return "xla"
  capability = getattr(jax.devices()[0], "compute_capability", "0")
  return "cudnn" if float(capability) >= 8.0 else "xla"


def resolve_scan_unroll(config: ml_collections.ConfigDict) -> int:
  """``execution.scan_unroll=0`` (automatic): every block of a stack in one iteration (no loop) on GPUs
  and TPUs, at the price of a longer compilation (README, Performance: compiled for an H200 the step moves
  0.5-0.7x the bytes; for TPU v5e chips, 0.5x the cycles by XLA's cost model); one block an iteration on
  CPUs, where the unrolled step compiles slower and runs no faster."""
  unroll = config.execution.scan_unroll
  if unroll:
    return unroll
  return config.model.network.num_blocks + 1 if jax.default_backend() in ("gpu", "tpu") else 1


def resolve_gamma_path(config: ml_collections.ConfigDict) -> str:
  """``eval.gamma_path="auto"``: "linear" for the fixed schedules with steep ends, else "schedule".

  cosine and linear_beta spend little t near their ends, where γ'(t) is
  large, so the uniform-t estimate of the ELBO is heavy-tailed there (its
  rare draws carry the bound). A linear schedule's path is already linear,
  and monotone_net learns its interior to minimise this very variance.
  Discrete time depends on the schedule's grid: always "schedule".
  """
  path = config.eval.gamma_path
  if config.model.num_diffusion_steps > 0:
    return "schedule"
  if path == "auto":
    return "linear" if config.model.schedule.name in schedules.CURVED_FIXED else "schedule"
  return path


def resolve_dtype(dtype: str) -> str:
  """``auto``: bfloat16 blocks on GPUs and TPUs, float32 on CPUs.

  Measured on an H200 (README, Performance): the paper's CIFAR-10 step in
  bf16 takes 0.56× TF32's time, and the Quick start trained in bf16 reports
  the same bpd as in TF32 (within 0.004, its stderr 0.022). On CPUs bf16
  brings no speed.
  """
  if dtype != "auto":
    return dtype
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def resolve_conv_grad(conv_grad: str, scan_blocks: bool) -> str:
  """``auto``: the written-out backward ("dot") only where it wins, scanned blocks on CPU.

  Measured on CPU (README, Performance): inside ``nn.scan`` XLA's own
  convolution gradients are 5–30× slower than "dot"; unrolled they are
  faster. On GPUs and TPUs XLA's are used.
  """
  if conv_grad != "auto":
    return conv_grad
  return "dot" if scan_blocks and jax.default_backend() == "cpu" else "xla"


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  opt, total = config.optimizer, config.training.num_steps
  peak, warmup = opt.learning_rate, opt.warmup_steps
  after = max(total - warmup, 1)
  if opt.decay == "cosine":
    decay = optax.cosine_decay_schedule(peak, after)
  elif opt.decay == "linear":
    decay = optax.linear_schedule(peak, 0.0, after)
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _decay_mask(params):
  """Weight decay on kernels only: not on biases, norm scales or γ endpoints."""
  def decays(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    return name in ("kernel", "embedding") and leaf.ndim >= 2
  return jax.tree_util.tree_map_with_path(decays, params)


def is_schedule_interior(path) -> bool:
  """A parameter of the schedule other than its endpoints (monotone_net's l1–l3)."""
  names = [str(getattr(entry, "key", entry)) for entry in path]
  return "schedule" in names and names[-1] not in ("gamma_min", "gamma_max")


def _scale_schedule_interior(inner: optax.GradientTransformation, scale: float) -> optax.GradientTransformation:
  """``inner`` with the updates of the schedule's interior multiplied by ``scale``.

  The state is ``inner``'s own, so checkpoints do not depend on the scale.
  """
  def update(updates, state, params=None, **extra_args):
    updates, state = inner.update(updates, state, params, **extra_args)
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * scale if is_schedule_interior(path) else u, updates), state
  return optax.GradientTransformationExtraArgs(inner.init, update)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with warm-up and decay in the chain, optional global-norm clipping.

  The schedule interior's updates (its learning rate and weight decay) are
  multiplied by ``optimizer.schedule_lr_scale``; the optimizer state is
  AdamW's whatever the scale, so a run may resume with another.
  """
  opt = config.optimizer
  adamw = optax.adamw(learning_rate_schedule(config), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                      weight_decay=opt.weight_decay, mask=_decay_mask)
  if opt.schedule_lr_scale != 1.0:
    adamw = _scale_schedule_interior(adamw, opt.schedule_lr_scale)
  if opt.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw)
  return adamw


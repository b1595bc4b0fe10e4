"""Every config loads and validates; the CIFAR-10 config is the paper's recipe."""

import importlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from vdm import config as config_lib

CONFIGS = ["base", "smoke", "mnist", "mnist_samples", "mnist_conditional", "cifar10", "cifar10_aug", "imagenet32", "imagenet64", "fashion_mnist"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_validates_and_builds(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  config_lib.validate(config)
  config_lib.build_model(config)
  config_lib.build_optimizer(config)
  with pytest.raises(AttributeError):
    config.training.nope  # noqa: B018  unknown fields are errors, not None


def test_cifar10_is_the_paper_recipe():
  """Checked on the objects the config builds, not on its literals."""
  from vdm import schedules, train_step
  c = importlib.import_module("configs.cifar10").get_config()
  model = config_lib.build_model(c)
  assert isinstance(model.schedule, schedules.LearnedLinear)
  gamma = model.schedule.apply(model.schedule.init(jax.random.key(0), jnp.zeros(2)), jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(gamma, [-13.3, 5.0], rtol=1e-6)
  assert (model.num_steps, model.antithetic_time_sampling, model.decoder) == (0, True, "softmax")
  net = model.network
  assert (net.channels, net.num_blocks, net.dropout, tuple(net.fourier_exponents)) == (128, 32, 0.1, (6, 7))
  assert net.mid_attention and not net.attention_everywhere and net.num_augmentations == 0
  params = train_step.abstract_state(c, (32, 32, 3)).params
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert round(count / 1e6, 1) == 30.6, count  # as the config's docstring says
  lr = config_lib.learning_rate_schedule(c)
  np.testing.assert_allclose([lr(0), lr(50), lr(100), lr(5_000_000)], [0.0, 1e-4, 2e-4, 2e-4], rtol=1e-6)
  o = c.optimizer
  assert (o.b1, o.b2, o.eps, o.weight_decay) == (0.9, 0.99, 1e-8, 0.01)
  assert (c.training.batch_size, o.ema_rate, c.data.dataset) == (128, 0.9999, "cifar10")


def test_augmented_cifar10_is_the_papers_second_model():
  from vdm import schedules
  c = importlib.import_module("configs.cifar10_aug").get_config()
  model = config_lib.build_model(c)
  assert c.data.dataset == "cifar10" and isinstance(model.schedule, schedules.MonotoneNet)
  net = model.network
  assert (net.channels, net.dropout, net.attention_everywhere, net.num_augmentations) == (256, 0.05, True, 8)


@pytest.mark.parametrize("name,dataset,target", [("cifar10", "cifar10", "2.65"), ("cifar10_aug", "cifar10", "2.49"),
                                                 ("imagenet32", "imagenet_resized/32x32", "3.72"),
                                                 ("imagenet64", "imagenet_resized/64x64", "3.40")])
def test_docstrings_give_the_command_and_the_published_target(name, dataset, target):
  module = importlib.import_module(f"configs.{name}")
  assert f"python train.py --config=configs/{name}.py" in module.__doc__ and target in module.__doc__
  assert module.get_config().data.dataset == dataset


@pytest.mark.parametrize("mult", [(), (1, 0), (2.0,)])
def test_channel_mult_must_be_positive_integers(mult):
  config = importlib.import_module("configs.mnist").get_config()
  with config.unlocked():
    config.model.network.channel_mult = mult
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.network\.channel_mult: expected a non-empty tuple"):
    config_lib.validate(config)


def test_input_skip_must_be_a_bool():
  import ml_collections
  saved = importlib.import_module("configs.mnist").get_config().to_dict()
  saved["model"]["network"]["input_skip"] = 1  # as a hand-written JSON config might have it
  config = ml_collections.ConfigDict(saved)
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.network\.input_skip: expected True or False, "
                                                   r"got 1"):
    config_lib.validate(config)


@pytest.mark.parametrize("name", ["mnist_samples", "mnist_conditional"])
def test_sample_recipes_weigh_noise_levels_unlike_the_elbo(name):
  """The sample recipes' training weighs λ = −γ unlike the ELBO, and evaluation estimates the ELBO.

  Per unit of λ, uniform t with weighting w puts w(λ_t) on the ELBO's integrand.
  With a linear schedule eps_mse's w is 1 (the ELBO: what mnist_samples
  trained until 2026-11-27); on the cosine schedule it falls 5.9×
  from mid noise (t = 0.5, λ ≈ 0.1) to low noise (t = 0.05, λ ≈ 4.9)
  (mnist_conditional), edm_monotone 4.8× (mnist_samples).
  """
  from vdm import objectives
  config = importlib.import_module(f"configs.{name}").get_config()
  model = config_lib.build_model(config)
  t = jnp.array([0.05, 0.5, 0.0, 1.0])
  variables = model.schedule.init(jax.random.key(0), t)
  gamma, slope = jax.jvp(lambda u: model.schedule.apply(variables, u), (t,), (jnp.ones_like(t),))
  w = objectives.loss_weight(model.loss_weighting, gamma[:2], slope[:2], gamma[2], gamma[3], model.sigmoid_bias)
  assert float(w[1]) > 4 * float(w[0]), w
  assert config_lib.build_model(config, for_eval=True).gamma_path == "linear"  # an honest bound for cosine


def test_channel_mult_levels_must_halve_the_images():
  config = importlib.import_module("configs.mnist_samples").get_config()
  config_lib.check_image_shape(config, (28, 28, 1))  # 28 → 14 → 7
  config.model.network.channel_mult = (1, 2, 2, 2)
  with pytest.raises(config_lib.ConfigError, match=r"channel_mult: expected at most as many levels as halvings "
                                                   r"of the images' 28×28 \(4 levels need height and width "
                                                   r"divisible by 8\), got \(1, 2, 2, 2\)"):
    config_lib.check_image_shape(config, (28, 28, 1))
  config.model.network.channel_mult, config.model.network.patch_size = (1, 2), 2
  config_lib.check_image_shape(config, (28, 28, 1))  # 2×2 patches: 14 → 7
  config.model.network.channel_mult = (1, 2, 2)
  with pytest.raises(config_lib.ConfigError, match=r"\(3 levels on 2×2 patches need height and width divisible by "
                                                   r"8\), got \(1, 2, 2\)"):
    config_lib.check_image_shape(config, (28, 28, 1))
  config.model.network.patch_size = 0
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.network\.patch_size: expected a positive "
                                                   r"integer \(1 = no patches\), got 0"):
    config_lib.validate(config)


@pytest.mark.parametrize("scale", [0.0, -2.0])
def test_schedule_lr_scale_must_be_positive(scale):
  config = importlib.import_module("configs.mnist").get_config()
  config.optimizer.schedule_lr_scale = scale
  with pytest.raises(config_lib.ConfigError, match=r"config\.optimizer\.schedule_lr_scale: expected > 0 \(1 = the "
                                                   r"network's rate\), got " + str(scale)):
    config_lib.validate(config)


def test_configs_are_typesafe():
  config = importlib.import_module("configs.mnist").get_config()
  with pytest.raises(TypeError):
    config.training.num_steps = "many"


def test_conv_grad_auto_writes_out_the_backward_only_for_scanned_blocks_on_cpu():
  assert jax.default_backend() == "cpu"
  assert config_lib.resolve_conv_grad("auto", True) == "dot"
  assert config_lib.resolve_conv_grad("auto", False) == "xla"
  assert config_lib.resolve_conv_grad("dot", False) == "dot" and config_lib.resolve_conv_grad("xla", True) == "xla"


# The config.json of a CIFAR-10 checkpoint from before the config had sections (flat ``model``),
# before conv_grad, matmul_precision, remat_policy, data.augment, eval.full_precision existed,
# and with the since-removed training.debug_nonfinite_step: as the first version wrote it.
FIRST_CHECKPOINT_CONFIG = {
    "data": {"data_dir": "", "dataset": "cifar10"},
    "eval": {"batch_size": 256, "draws": 1, "num_samples": 64, "periodic_examples": 2048, "sample_steps": 1000,
             "split": "test"},
    "model": {"antithetic_time_sampling": True, "attention_everywhere": False, "channels": 128,
              "decoder": "softmax", "dropout": 0.1, "dtype": "float32", "fourier_exponents": [6, 7],
              "gamma_max": 5.0, "gamma_min": -13.3, "mid_attention": True, "num_blocks": 32,
              "num_diffusion_steps": 0, "remat": True, "scan_blocks": True, "schedule": "learned_linear",
              "schedule_hidden": 1024, "vocab_size": 256},
    "optimizer": {"b1": 0.9, "b2": 0.99, "decay": "constant", "ema_rate": 0.9999, "ema_warmup": True,
                  "eps": 1e-08, "grad_clip_norm": 0.0, "learning_rate": 0.0002, "warmup_steps": 100,
                  "weight_decay": 0.01},
    "seed": 0,
    "training": {"batch_size": 128, "checkpoint_every": 10000, "checkpoints_to_keep": 3, "debug_nonfinite_step": -1,
                 "eval_every": 50000, "grad_accum_steps": 1, "log_every": 1000, "num_steps": 10000000,
                 "on_nonfinite": "skip", "steps_per_call": 1},
}


def test_a_first_version_checkpoint_config_migrates_to_the_model_it_trained(tmp_path):
  import flax
  import jax.numpy as jnp
  import ml_collections

  from vdm import checkpoints

  @flax.struct.dataclass
  class State:
    step: jax.Array
    key: jax.Array

  mngr = checkpoints.manager(str(tmp_path / "checkpoints"))
  checkpoints.save(mngr, State(jnp.int32(3), jax.random.key(0)), ml_collections.ConfigDict(FIRST_CHECKPOINT_CONFIG),
                   {"image_shape": [32, 32, 3]})
  restored, metadata = checkpoints.restore_config(mngr)
  # Today's CIFAR-10 config, with the values those checkpoints ran with where later fields differ.
  config = importlib.import_module("configs.cifar10").get_config()
  want = config.copy_and_resolve_references()
  want.execution.conv_grad, want.execution.remat_policy = "xla", "full"
  want.execution.dtype = "float32"  # saved then; "auto" came later …
  want.execution.dropout_rng, want.execution.skip_concat = "threefry", "before_norm"  # … and these fields
  want.execution.skip_projection = "dense"  # matmuls, as then (the same function)
  want.execution.attention = "xla"  # flax's attention, as then
  want.training.minimize_variance = False  # those runs' monotone_net interior followed the ELBO
  want.optimizer.schedule_lr_scale = 1.0  # … at the network's learning rate
  want.eval.gamma_path = "schedule"  # evaluated along the schedule's own path, as then
  # The Pallas kernels launched as they then were (the same function).
  want.execution.pallas_num_warps, want.execution.pallas_programs, want.execution.pallas_accumulate = 8, 1, "rows"
  want.execution.threefry_gpu_kernel = False  # Threefry lowered as then (the same bits)
  assert _plain(restored.to_dict()) == _plain(want.to_dict())
  config_lib.validate(restored)
  # Same parameters: the two configs build models with identical parameter trees.
  from vdm import train_step
  shapes = lambda c: jax.tree.map(lambda x: x.shape, train_step.abstract_state(c, (8, 8, 3)).params)  # noqa: E731
  small = lambda c: c.model.network.update(channels=8, num_blocks=1) or c  # noqa: E731
  assert shapes(small(restored.copy_and_resolve_references())) == shapes(small(config.copy_and_resolve_references()))
  checkpoints.check_compatible(mngr, None, config, metadata["image_shape"])  # execution fields may differ
  config.model.network.channels = 64
  with pytest.raises(checkpoints.CheckpointError, match="model.network.channels: checkpoint 128, config 64"):
    checkpoints.check_compatible(mngr, None, config, (32, 32, 3))


def test_migration_leaves_todays_configs_unchanged():
  from vdm import checkpoints
  for name in CONFIGS:
    config = importlib.import_module(f"configs.{name}").get_config()
    assert _plain(checkpoints.migrate_config(config.to_dict()).to_dict()) == _plain(config.to_dict())


def _plain(tree):
  """Tuples as lists (JSON has no tuples)."""
  if isinstance(tree, dict):
    return {k: _plain(v) for k, v in tree.items()}
  return [_plain(v) for v in tree] if isinstance(tree, (list, tuple)) else tree


def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpus(monkeypatch):
  config = importlib.import_module("configs.cifar10").get_config()
  assert config.execution.dtype == "auto"
  config_lib.validate(config)
  assert config_lib.resolve_dtype("auto") == "float32"  # this machine's backend is the CPU
  assert config_lib.build_model(config).network.dtype == jnp.float32
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert config_lib.resolve_dtype("auto") == "bfloat16"
  assert config_lib.resolve_dtype("float32") == "float32"  # a named dtype is kept everywhere
  assert config_lib.build_model(config).network.dtype == jnp.bfloat16
  assert config_lib.build_model(config, for_eval=True).network.dtype == jnp.float32  # evaluation: full precision
  config.execution.dtype = "float16"
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.execution.dtype: expected one of \('float32', 'bfloat16', 'auto'\), got 'float16'"):
    config_lib.validate(config)


def test_eval_gamma_path_auto_is_linear_for_schedules_with_steep_ends():
  config = importlib.import_module("configs.mnist").get_config()
  assert config.eval.gamma_path == "auto"
  for name, path in [("learned_linear", "schedule"), ("monotone_net", "schedule"), ("cosine", "linear"),
                     ("linear_beta", "linear")]:
    config.model.schedule.name = name
    assert config_lib.resolve_gamma_path(config) == path, name
    assert config_lib.build_model(config, for_eval=True).gamma_path == path
    assert config_lib.build_model(config).gamma_path == "schedule"  # training: always the schedule's path
  config.model.num_diffusion_steps = 10  # discrete time depends on the schedule's grid
  assert config_lib.resolve_gamma_path(config) == "schedule"
  config.eval.gamma_path = "linear"
  with pytest.raises(config_lib.ConfigError, match=r"config\.eval\.gamma_path: expected 'auto' or 'schedule' in "
                                                   r"discrete time .*, got 'linear'"):
    config_lib.validate(config)
  config.eval.gamma_path = "uniform"
  with pytest.raises(config_lib.ConfigError, match=r"config\.eval\.gamma_path: expected one of \('auto', "
                                                   r"'schedule', 'linear'\), got 'uniform'"):
    config_lib.validate(config)

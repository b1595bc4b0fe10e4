"""Every config loads and validates; the CIFAR-10 config is the paper's recipe."""

import importlib

import jax
import pytest

from vdm import config as config_lib

CONFIGS = ["base", "smoke", "mnist", "cifar10", "cifar10_aug", "imagenet32", "imagenet64", "fashion_mnist"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_validates_and_builds(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  config_lib.validate(config)
  config_lib.build_model(config)
  config_lib.build_optimizer(config)
  with pytest.raises(AttributeError):
    config.training.nope  # noqa: B018  unknown fields are errors, not None


def test_cifar10_is_the_paper_recipe():
  c = importlib.import_module("configs.cifar10").get_config()
  m, o = c.model, c.optimizer
  assert (m.schedule, m.gamma_min, m.gamma_max, m.num_diffusion_steps) == ("learned_linear", -13.3, 5.0, 0)
  assert (m.channels, m.num_blocks, m.dropout, tuple(m.fourier_exponents)) == (128, 32, 0.1, (6, 7))
  assert m.antithetic_time_sampling and m.mid_attention and not m.attention_everywhere
  assert (o.learning_rate, o.b1, o.b2, o.eps, o.weight_decay, o.warmup_steps) == (2e-4, 0.9, 0.99, 1e-8, 0.01, 100)
  assert (c.training.batch_size, o.ema_rate, c.data.dataset) == (128, 0.9999, "cifar10")


def test_augmented_cifar10_is_the_papers_second_model():
  c = importlib.import_module("configs.cifar10_aug").get_config()
  m = c.model
  assert c.data.augment and c.data.dataset == "cifar10"
  assert (m.channels, m.schedule, m.dropout, m.attention_everywhere) == (256, "monotone_net", 0.05, True)
  assert config_lib.build_model(c).network.num_augmentations == 8


@pytest.mark.parametrize("name,dataset,target", [("cifar10", "cifar10", "2.65"), ("cifar10_aug", "cifar10", "2.49"),
                                                 ("imagenet32", "imagenet_resized/32x32", "3.72"),
                                                 ("imagenet64", "imagenet_resized/64x64", "3.40")])
def test_docstrings_give_the_command_and_the_published_target(name, dataset, target):
  module = importlib.import_module(f"configs.{name}")
  assert f"python train.py --config=configs/{name}.py" in module.__doc__ and target in module.__doc__
  assert module.get_config().data.dataset == dataset


def test_configs_are_typesafe():
  config = importlib.import_module("configs.mnist").get_config()
  with pytest.raises(TypeError):
    config.training.num_steps = "many"


def test_conv_grad_auto_writes_out_the_backward_only_for_scanned_blocks_on_cpu():
  assert jax.default_backend() == "cpu"
  assert config_lib.resolve_conv_grad("auto", True) == "dot"
  assert config_lib.resolve_conv_grad("auto", False) == "xla"
  assert config_lib.resolve_conv_grad("dot", False) == "dot" and config_lib.resolve_conv_grad("xla", True) == "xla"


def test_checkpoints_written_before_later_fields_load_with_the_values_they_were_trained_with(tmp_path):
  import flax
  import jax.numpy as jnp
  import ml_collections

  from vdm import checkpoints

  @flax.struct.dataclass
  class State:
    step: jax.Array
    key: jax.Array

  config = importlib.import_module("configs.cifar10").get_config()
  old = config.to_dict()
  for section, fields in checkpoints.LATER_FIELDS.items():
    for name in fields:
      del old[section][name]
  old["training"]["debug_nonfinite_step"] = -1  # removed since
  mngr = checkpoints.manager(str(tmp_path / "checkpoints"))
  checkpoints.save(mngr, State(jnp.int32(3), jax.random.key(0)), ml_collections.ConfigDict(old),
                   {"image_shape": [32, 32, 3]})
  restored, metadata = checkpoints.restore_config(mngr)
  assert (restored.model.conv_grad, restored.model.matmul_precision, restored.model.remat_policy,
          restored.data.augment) == ("xla", "default", "full", False)
  config_lib.validate(restored)
  fields = lambda c: {(s, f) for s in c for f in (c[s] if isinstance(c[s], dict) else ())}  # noqa: E731
  assert fields(restored.to_dict()) == fields(config.to_dict())  # nothing missing, nothing left over
  checkpoints.check_compatible(mngr, None, config, metadata["image_shape"])  # execution fields may differ
  config.model.channels = 64
  with pytest.raises(checkpoints.CheckpointError, match="model.channels: checkpoint 128, config 64"):
    checkpoints.check_compatible(mngr, None, config, (32, 32, 3))

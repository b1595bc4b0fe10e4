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

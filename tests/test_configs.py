"""Every config loads and validates; the CIFAR-10 config is the paper's recipe."""

import importlib

import pytest

from vdm import config as config_lib

CONFIGS = ["base", "smoke", "mnist", "cifar10"]


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


def test_configs_are_typesafe():
  config = importlib.import_module("configs.mnist").get_config()
  with pytest.raises(TypeError):
    config.training.num_steps = "many"

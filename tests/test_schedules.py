"""Schedules: monotone, pinned to their endpoints, derivatives by jvp."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from vdm import schedules

NAMES = list(schedules.SCHEDULES)
T = jnp.linspace(0.0, 1.0, 1001)


def _init_perturbed(module, seed):
  """Params with every leaf moved randomly, as training might move them."""
  params = module.init(jax.random.key(seed), T)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  leaves = [leaf + jax.random.normal(k, leaf.shape) * (1.0 + jnp.abs(leaf)) for leaf, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("name", NAMES)
def test_strictly_increasing_and_pinned_to_endpoints(name):
  for seed in range(3):
    module = schedules.get_schedule(name, -13.3, 5.0, **({"hidden": 16} if name == "monotone_net" else {}))
    params = _init_perturbed(module, seed)
    gamma = module.apply(params, T)
    assert gamma.shape == T.shape
    assert bool(jnp.all(jnp.diff(gamma) > 0)), name
    p = params.get("params", {})
    lo, hi = (p["gamma_min"], p["gamma_max"]) if "gamma_min" in p else (-13.3, 5.0)
    np.testing.assert_allclose(gamma[0], lo, atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(gamma[-1], hi, atol=1e-5, rtol=1e-6)
    scalar = module.apply(params, jnp.float32(0.3))
    assert scalar.shape == () and jnp.isclose(scalar, module.apply(params, jnp.array([0.3]))[0])


@pytest.mark.parametrize("name", ["learned_linear", "monotone_net"])
def test_learned_endpoints_stay_exact_after_large_moves(name):
  module = schedules.get_schedule(name, -13.3, 5.0, **({"hidden": 32} if name == "monotone_net" else {}))
  params = module.init(jax.random.key(0), T)
  params = jax.tree.map(lambda p: p * 3.0 + 0.7, params)  # far from init, endpoints -39.2 < 15.7
  gamma = module.apply(params, jnp.array([0.0, 1.0]))
  assert float(gamma[0]) == float(params["params"]["gamma_min"])
  np.testing.assert_allclose(gamma[1], params["params"]["gamma_max"], rtol=1e-6)


@pytest.mark.parametrize("name", ["learned_linear", "monotone_net"])
def test_learned_schedules_increase_even_with_crossed_endpoints(name):
  """The span is |γ_1 − γ_0|, as the reference's |w|: γ(1) = γ_0 + |γ_1 − γ_0| when the two cross."""
  module = schedules.get_schedule(name, -13.3, 5.0, **({"hidden": 16} if name == "monotone_net" else {}))
  params = module.init(jax.random.key(0), T)
  params["params"]["gamma_min"], params["params"]["gamma_max"] = jnp.float32(2.0), jnp.float32(-4.0)
  gamma = module.apply(params, T)
  assert bool(jnp.all(jnp.diff(gamma) > 0))
  assert float(gamma[0]) == 2.0
  np.testing.assert_allclose(gamma[-1], 8.0, rtol=1e-6)
  # Uncrossed, the |·| changes nothing, gradients included: d γ(t) / d γ_max = t for the linear schedule.
  if name == "learned_linear":
    params["params"]["gamma_min"], params["params"]["gamma_max"] = jnp.float32(-13.3), jnp.float32(5.0)
    grads = jax.grad(lambda p: module.apply(p, jnp.float32(0.25)))(params)["params"]
    np.testing.assert_allclose([grads["gamma_min"], grads["gamma_max"]], [0.75, 0.25], rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_jvp_derivative_matches_finite_differences(name):
  module = schedules.get_schedule(name, -13.3, 5.0, **({"hidden": 16} if name == "monotone_net" else {}))
  params = module.init(jax.random.key(1), T)
  t = jnp.linspace(0.05, 0.95, 19)
  _, dgamma = jax.jvp(lambda t: module.apply(params, t), (t,), (jnp.ones_like(t),))
  h = 1e-3
  fd = (module.apply(params, t + h) - module.apply(params, t - h)) / (2 * h)
  np.testing.assert_allclose(dgamma, fd, rtol=5e-3, atol=5e-3)


def _reparameterised_tau(module, t):
  tau_0, tau_1 = module.base_tau(module.gamma_min), module.base_tau(module.gamma_max)
  return tau_0 + (tau_1 - tau_0) * t


def test_cosine_is_nichol_dhariwal_alpha_bar():
  module = schedules.Cosine(gamma_min=-13.3, gamma_max=5.0, s=0.008)
  t = np.linspace(0, 1, 11)
  tau = _reparameterised_tau(module, t)
  f = lambda tau: np.cos(0.5 * np.pi * (tau + 0.008) / 1.008) ** 2  # noqa: E731
  alpha_bar = f(tau) / f(0.0)
  gamma = np.asarray(module.apply({}, jnp.asarray(t, jnp.float32)), np.float64)
  np.testing.assert_allclose(1 / (1 + np.exp(gamma)), alpha_bar, rtol=2e-5)


def test_linear_beta_is_ddpm_alpha_bar():
  module = schedules.LinearBeta(gamma_min=-10.0, gamma_max=6.0, beta_0=0.1, beta_1=20.0)
  t = np.linspace(0, 1, 11)
  tau = _reparameterised_tau(module, t)
  alpha_bar = np.exp(-(0.1 * tau + 0.5 * (20.0 - 0.1) * tau**2))
  gamma = np.asarray(module.apply({}, jnp.asarray(t, jnp.float32)), np.float64)
  np.testing.assert_allclose(1 / (1 + np.exp(gamma)), alpha_bar, rtol=5e-5)


def test_bad_schedule_arguments_are_refused():
  with pytest.raises(ValueError, match="unknown schedule 'nope'; expected one of"):
    schedules.get_schedule("nope", -13.3, 5.0)
  with pytest.raises(ValueError, match="gamma_min .* must be < gamma_max"):
    schedules.get_schedule("fixed_linear", 5.0, -13.3)


def test_monotone_net_slope_in_closed_form_is_its_derivative():
  module = schedules.get_schedule("monotone_net", -13.3, 5.0, hidden=16)
  params = _init_perturbed(module, 4)
  gamma, slope, probe = module.apply(params, T, method="with_slope")
  _, by_jvp = jax.jvp(lambda t: module.apply(params, t), (T,), (jnp.ones_like(T),))
  np.testing.assert_allclose(gamma, module.apply(params, T), rtol=0, atol=0)
  np.testing.assert_allclose(slope, by_jvp, rtol=2e-5, atol=1e-5)
  # Against a float64 central difference of the same function.
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params["params"])
  sp = lambda x: np.logaddexp(0.0, x)  # noqa: E731

  def g(t):
    h = t[:, None] * sp(p["l1"]["kernel"][0, 0]) + p["l1"]["bias"]
    s = 1.0 / (1.0 + np.exp(-(h @ sp(p["l2"]["kernel"]) + p["l2"]["bias"])))
    return h[:, 0] + s @ sp(p["l3"]["kernel"])[:, 0] + p["l3"]["bias"][0]

  ends = g(np.array([0.0, 1.0]))
  span = abs(p["gamma_max"] - p["gamma_min"]) / (ends[1] - ends[0])
  t, h = np.linspace(0.05, 0.95, 19), 1e-6
  np.testing.assert_allclose(module.apply(params, t, method="with_slope")[1],
                             span * (g(t + h) - g(t - h)) / (2 * h), rtol=1e-4)
  assert not np.any(probe)

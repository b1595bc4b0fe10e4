"""The probability-flow ODE (vdm.ode): drift, sampler and likelihood against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles

from vdm import losses, ode, sampling

jax.config.update("jax_enable_x64", False)

GAMMA_MIN, GAMMA_MAX = -13.3, 5.0


def _gamma_fn(t):
  return GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * t


def _alpha_sq(t):
  return 1.0 / (1.0 + np.exp(_gamma_fn(t)))


_gaussian = oracles.gaussian


def _model_log_density(z_0, mean, std):
  """log p_0(z_0) of the ODE model: the flow of Gaussian data is affine, z_1 = α_1 m + √(v_1/v_0)(z_0 − α_0 m),
  and the model puts N(0, I) at t = 1; float64."""
  mean, var = np.asarray(mean, np.float64), np.square(np.asarray(std, np.float64))
  a0, a1 = np.sqrt(_alpha_sq(0.0)), np.sqrt(_alpha_sq(1.0))
  v0, v1 = a0 ** 2 * var + (1 - a0 ** 2), a1 ** 2 * var + (1 - a1 ** 2)
  scale = np.sqrt(v1 / v0)
  z_1 = a1 * mean + scale * (np.asarray(z_0, np.float64) - a0 * mean)
  return (-0.5 * np.sum(z_1 ** 2, -1) - 0.5 * z_1.shape[-1] * np.log(2 * np.pi) + np.sum(np.log(scale)))


def test_drift_is_the_probability_flow_of_the_variance_preserving_sde():
  # f = −½ σ² γ', g² = σ² γ' (from α² = sigmoid(−γ)); dz/dt = f z + ½ g² ε̂/σ, written out in float64.
  z = np.random.default_rng(0).normal(size=(3, 4))
  eps = np.random.default_rng(1).normal(size=(3, 4))
  t = 0.37
  got = ode.drift(lambda z_, g: jnp.asarray(eps, jnp.float32), _gamma_fn, jnp.float32(t), jnp.asarray(z, jnp.float32))
  gamma, dgamma = _gamma_fn(t), GAMMA_MAX - GAMMA_MIN
  sigma_sq = 1.0 / (1.0 + np.exp(-gamma))
  want = -0.5 * sigma_sq * dgamma * z + 0.5 * sigma_sq * dgamma * eps / np.sqrt(sigma_sq)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_ode_likelihood_of_gaussian_data_equals_the_closed_form():
  mean, std = jnp.array([0.3, -0.5, 0.0, 0.8]), jnp.array([0.2, 0.05, 0.5, 0.01])
  a0 = np.sqrt(_alpha_sq(0.0))
  z_0 = a0 * mean + jnp.sqrt(a0 ** 2 * std ** 2 + (1 - a0 ** 2)) * jax.random.normal(jax.random.key(0), (8, 4))
  probe = jax.random.rademacher(jax.random.key(1), z_0.shape, jnp.float32)
  log_p, steps, failed = jax.jit(lambda z: ode.log_likelihood(_gaussian(mean, std), _gamma_fn, z, probe,
                                                              rtol=1e-6, atol=1e-6))(z_0)
  assert not bool(failed) and int(steps) > 5
  # The Jacobian is diagonal, so Rademacher Hutchinson is exact: agreement is down to the solver.
  np.testing.assert_allclose(np.asarray(log_p), _model_log_density(z_0, mean, std), atol=2e-3, rtol=1e-5)


def test_tighter_tolerances_take_more_steps_and_land_closer():
  mean, std = jnp.array([0.3, -0.5, 0.0]), jnp.array([0.2, 0.05, 0.1])
  z_1 = jax.random.normal(jax.random.key(2), (16, 3))
  run = lambda tol: jax.jit(lambda z: ode.sample(_gaussian(mean, std), _gamma_fn, z, rtol=tol, atol=tol))(z_1)  # noqa: E731
  (z_loose, steps_loose, _), (z_tight, steps_tight, _) = run(1e-2), run(1e-6)
  # The exact map is affine (see _model_log_density), inverted here.
  a0, a1 = np.sqrt(_alpha_sq(0.0)), np.sqrt(_alpha_sq(1.0))
  var = np.square(np.asarray(std, np.float64))
  v0, v1 = a0 ** 2 * var + (1 - a0 ** 2), a1 ** 2 * var + (1 - a1 ** 2)
  exact = a0 * np.asarray(mean) + np.sqrt(v0 / v1) * (np.asarray(z_1, np.float64) - a1 * np.asarray(mean))
  err_loose, err_tight = np.abs(z_loose - exact).max(), np.abs(z_tight - exact).max()
  assert int(steps_tight) > int(steps_loose)
  assert err_tight < 1e-4 < err_loose


def test_ode_sampler_with_the_oracle_recovers_a_two_point_distribution():
  values = jnp.array([[10, 200, 30], [240, 5, 100]])
  points = losses.encode(values)
  n = 1000
  z_1 = jax.random.normal(jax.random.key(3), (n, 3))
  z_0, steps, failed = jax.jit(lambda z: ode.sample(oracles.point_mixture(points, [0.3, 0.7]), _gamma_fn, z,
                                                    rtol=1e-4, atol=1e-4))(z_1)
  assert not bool(failed)
  images = np.asarray(sampling.decode(z_0, _gamma_fn(0.0), 256))
  is_first = (images == np.asarray(values[0])).all(1)
  is_second = (images == np.asarray(values[1])).all(1)
  # p_0 is the two points blurred by σ_0 ≈ 1.3e-3 (1/3 of a bin), which the ODE reproduces: ~0.3% of values
  # decode to a neighbour, as with the other samplers.
  assert (is_first | is_second).mean() > 0.97
  assert abs(is_first.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)


def test_unknown_dequantization_is_refused():
  with pytest.raises(ValueError, match="unknown dequantization 'gaussian'"):
    ode.nll_bound(None, None, jnp.zeros((1, 2), jnp.int32), jax.random.key(0), dequantization="gaussian")

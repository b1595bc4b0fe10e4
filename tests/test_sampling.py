"""Reverse steps against the Gaussian posterior; whole samplers on toy data."""

import numpy as np
import pytest

import oracles
from perturbation import perturbed

import jax
import jax.numpy as jnp
from vdm import losses, sampling


def _sig(g):
  return 1 / (1 + np.exp(-g))


def _posterior(x, z_t, g_t, g_s):
  """Mean and variance of q(z_s│z_t, x), float64 (paper eq. 6)."""
  a_t, a_s = np.sqrt(_sig(-g_t)), np.sqrt(_sig(-g_s))
  s2_t, s2_s = _sig(g_t), _sig(g_s)
  a_ts = a_t / a_s
  s2_ts = s2_t - a_ts**2 * s2_s
  mean = a_ts * s2_s / s2_t * z_t + a_s * s2_ts / s2_t * x
  return mean, s2_ts * s2_s / s2_t


@pytest.mark.parametrize("g_t,g_s", [(5.0, 4.0), (-2.0, -3.5), (-12.0, -13.3), (0.0, -13.3)])
def test_ancestral_step_is_the_posterior_given_the_true_noise(g_t, g_s):
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 4, 4, 3))
  eps = rng.standard_normal(x.shape)
  z_t = np.sqrt(_sig(-g_t)) * x + np.sqrt(_sig(g_t)) * eps
  mean, var = _posterior(x, z_t, g_t, g_s)
  zero, one = np.zeros_like(x), np.ones_like(x)
  got_mean = sampling.ancestral_step(z_t, eps, g_t, g_s, zero)
  np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-5)
  got_std = sampling.ancestral_step(z_t, eps, g_t, g_s, one) - got_mean
  np.testing.assert_allclose(got_std, np.sqrt(var) * one, rtol=1e-3, atol=1e-6)
  # DDIM with η = 1 has the same variance; η = 0 none.
  ddim_1 = sampling.ddim_step(z_t, eps, g_t, g_s, 1.0, one) - sampling.ddim_step(z_t, eps, g_t, g_s, 1.0, zero)
  np.testing.assert_allclose(ddim_1, np.sqrt(var) * one, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("g_t,g_s", [(5.0, 4.0), (-2.0, -3.5), (3.0, -13.3)])
def test_ddim_step_with_the_true_noise_is_exact(g_t, g_s):
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (3, 5))
  eps = rng.standard_normal(x.shape)
  z_t = np.sqrt(_sig(-g_t)) * x + np.sqrt(_sig(g_t)) * eps
  want = np.sqrt(_sig(-g_s)) * x + np.sqrt(_sig(g_s)) * eps
  np.testing.assert_allclose(sampling.ddim_step(z_t, eps, g_t, g_s), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sampling.ddim_step(z_t, eps, g_t, g_s, 0.0, np.ones_like(x)), want,
                             rtol=1e-4, atol=1e-5)


def test_steps_accept_per_example_gamma():
  rng = np.random.default_rng(2)
  z, e, n = rng.standard_normal((3, 2, 4, 4, 1))
  g_t, g_s = np.array([1.0, -3.0]), np.array([0.0, -5.0])
  batched = sampling.ancestral_step(z, e, g_t, g_s, n)
  for i in range(2):
    np.testing.assert_allclose(batched[i:i + 1], sampling.ancestral_step(z[i:i + 1], e[i:i + 1], g_t[i], g_s[i],
                                                                         n[i:i + 1]), rtol=1e-6)


def test_clip_eps_hat_bounds_x_hat_and_keeps_inner_predictions():
  """The implied x̂ = (z_t − σ_t ε̂)/α_t becomes clip(x̂, −1, 1) on both sides; inner ε̂ are unchanged."""
  rng = np.random.default_rng(0)
  x_hat = np.linspace(-3.0, 3.0, 61)
  for g in (-5.0, 1.0, 4.0):
    a, s = np.sqrt(_sig(-g)), np.sqrt(_sig(g))
    eps_hat = rng.normal(size=x_hat.shape)
    z = a * x_hat + s * eps_hat
    clipped = np.asarray(sampling.clip_eps_hat(z[None].astype(np.float32), eps_hat[None].astype(np.float32), g),
                         np.float64)[0]
    np.testing.assert_allclose((z - s * clipped) / a, np.clip(x_hat, -1.0, 1.0), atol=1e-4, err_msg=f"gamma={g}")
    inside = np.abs(x_hat) < 1
    np.testing.assert_allclose(clipped[inside], eps_hat[inside], rtol=1e-4, atol=1e-5, err_msg=f"gamma={g}")


@pytest.mark.parametrize("decoder", ["softmax", "cdf"])
def test_decode_recovers_the_data_at_low_noise(decoder):
  x = jax.random.randint(jax.random.key(0), (2, 6, 6, 3), 0, 256)
  g0 = -13.3
  z0 = np.sqrt(_sig(-g0)) * losses.encode(x) + 0.5 * np.sqrt(_sig(g0)) * jax.random.normal(jax.random.key(1), x.shape)
  np.testing.assert_array_equal(sampling.decode(z0, g0, 256, decoder), x)
  drawn = sampling.decode(z0, g0, 256, decoder, key=jax.random.key(2))
  assert drawn.dtype == jnp.int32 and float(jnp.mean(drawn == x)) > 0.9


def _gamma_fn(t):
  return -13.3 + 18.3 * t


_oracle = oracles.point_mixture


@pytest.mark.parametrize("sampler,eta", [("ancestral", 1.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_samplers_with_the_oracle_land_on_a_single_point(sampler, eta):
  point = losses.encode(jnp.array([[3, 128, 250, 77]]))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(16))
  z_1 = jax.random.normal(jax.random.key(1), (16, 4))
  run = jax.jit(lambda z: sampling.sample_loop(_oracle(point), _gamma_fn, z, keys, 50, sampler=sampler, eta=eta))
  z_0 = run(z_1)
  images = sampling.decode(z_0, _gamma_fn(0.0), 256)
  np.testing.assert_array_equal(images, jnp.broadcast_to(jnp.array([3, 128, 250, 77]), (16, 4)))


@pytest.mark.parametrize("sampler,eta", [("ancestral", 1.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_samplers_with_the_oracle_recover_a_two_point_distribution(sampler, eta):
  values = jnp.array([[10, 200, 30], [240, 5, 100]])
  points = losses.encode(values)
  n = 1000
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(n))
  z_1 = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 10_000), (3,)))(keys)
  z_0 = jax.jit(lambda z: sampling.sample_loop(_oracle(points, [0.3, 0.7]), _gamma_fn, z, keys, 100,
                                               sampler=sampler, eta=eta))(z_1)
  images = np.asarray(sampling.decode(z_0, _gamma_fn(0.0), 256))
  is_first = (images == np.asarray(values[0])).all(1)
  is_second = (images == np.asarray(values[1])).all(1)
  # z_0 keeps σ_0 ≈ 1.3e-3 of noise, 1/3 of a bin: ~0.3% of values decode to a neighbour.
  assert (is_first | is_second).mean() > 0.97
  assert abs(is_first.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)


@pytest.mark.parametrize("gamma", [-3.0, 4.0])
def test_langevin_steps_keep_the_marginal_and_pull_a_wrong_start_towards_it(gamma):
  """x ~ N(0.3, 0.5²) in each of 784 dimensions, so q(z_γ) = N(α 0.3, v) and ε̂ is exact (oracles.gaussian).

  With r = 0.1 the step is δ ≈ 2 r² v; the discretised chain's stationary
  variance is v / (1 − δ/2v) ≈ 1.01 v. A start too narrow has larger steps
  (δ ∝ 1/‖ε̂‖²) and is pulled in quickly, one too wide slowly (a float64
  NumPy chain: 0.09 v → 0.97 v and 4 v → 2.6 v in 50 steps).
  """
  eps_fn = oracles.gaussian(0.3, 0.5)
  n, d = 200, 784
  alpha, sigma_sq = np.sqrt(_sig(-gamma)), _sig(gamma)
  mean, var = alpha * 0.3, alpha**2 * 0.25 + sigma_sq
  gammas = jnp.full((n,), gamma, jnp.float32)

  @jax.jit
  def chain(z):
    def body(j, z):
      xi = jax.random.normal(jax.random.fold_in(jax.random.key(3), j), z.shape)
      return sampling.langevin_step(z, eps_fn(z, gammas), gammas, 0.1, xi)
    return jax.lax.fori_loop(0, 50, body, z)

  def variance_after(scale, key):
    z = mean + scale * np.sqrt(var) * jax.random.normal(jax.random.key(key), (n, d))
    z = np.asarray(chain(z), np.float64)
    assert abs(z.mean() - mean) < 0.01 * np.sqrt(var)
    return z.var() / var

  assert 1.0 < variance_after(1.0, 0) < 1.025
  assert 0.9 < variance_after(0.3, 1) < 1.0
  assert 2.3 < variance_after(2.0, 2) < 2.9


def test_the_corrector_is_off_by_default_and_draws_the_two_point_distribution():
  # 64 dimensions: the step size r² ‖ξ‖²/‖score‖² of a few dimensions is too erratic (images have hundreds).
  values = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 64)))
  points = losses.encode(values)
  n = 1000
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(n))
  z_1 = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 10_000), (64,)))(keys)
  run = jax.jit(lambda z, steps: sampling.sample_loop(_oracle(points, [0.3, 0.7]), _gamma_fn, z, keys, 100,
                                                      langevin_steps=steps), static_argnums=1)
  np.testing.assert_array_equal(run(z_1, 0), sampling.sample_loop(_oracle(points, [0.3, 0.7]), _gamma_fn, z_1,
                                                                  keys, 100))
  corrected = run(z_1, 2)
  assert float(jnp.abs(corrected - run(z_1, 0)).max()) > 1e-3
  images = np.asarray(sampling.decode(corrected, _gamma_fn(0.0), 256))
  distances = np.abs(images[:, None, :] - np.asarray(values)[None]).sum(-1)  # [n, 2]
  nearest = distances.argmin(1)
  assert (np.abs(images - np.asarray(values)[nearest]) <= 1).mean() > 0.99  # σ_0 is 1/3 of a bin
  assert abs((nearest == 0).mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)


def test_ddim_eta_zero_is_deterministic_given_z1_and_the_keys_matter_otherwise():
  point = losses.encode(jnp.array([[3, 128], [200, 1]]))
  z_1 = jax.random.normal(jax.random.key(1), (4, 2))
  run = lambda keys, sampler, eta: sampling.sample_loop(_oracle(point), _gamma_fn, z_1, keys, 20,  # noqa: E731
                                                        sampler=sampler, eta=eta)
  k1 = jax.random.split(jax.random.key(0), 4)
  k2 = jax.random.split(jax.random.key(7), 4)
  np.testing.assert_array_equal(run(k1, "ddim", 0.0), run(k2, "ddim", 0.0))
  assert float(jnp.abs(run(k1, "ancestral", 1.0) - run(k2, "ancestral", 1.0)).max()) > 1e-4


def test_unknown_sampler_is_refused():
  with pytest.raises(ValueError, match="unknown sampler 'euler'"):
    sampling.sample_loop(None, None, jnp.zeros((1, 2)), None, 10, sampler="euler")


def _tiny_vdm():
  from configs import smoke
  from vdm import config as config_lib
  config = smoke.get_config()
  model = config_lib.build_model(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1), jnp.int32), jax.random.key(1))["params"]
  params = perturbed(params)  # off the identity-at-init network
  return model, params


def test_the_loop_cut_into_calls_gives_the_same_samples_and_the_bar_counts_steps(capsys):
  from vdm import sharding
  model, params = _tiny_vdm()
  key = jax.random.key(7)
  whole, z_whole = sampling.generate(model, params, key, 3, (8, 8, 1), num_steps=12)
  for steps_per_call, mesh in [(5, None), (1, None), (12, sharding.make_mesh()), (5, sharding.make_mesh())]:
    images, z = sampling.generate(model, params, key, 3, (8, 8, 1), num_steps=12, steps_per_call=steps_per_call,
                                  mesh=mesh)
    np.testing.assert_array_equal(images, whole)
    np.testing.assert_allclose(z, z_whole, rtol=0, atol=1e-6)
  corrected, _ = sampling.generate(model, params, key, 3, (8, 8, 1), num_steps=12, langevin_steps=1)
  cut, _ = sampling.generate(model, params, key, 3, (8, 8, 1), num_steps=12, langevin_steps=1, steps_per_call=5)
  np.testing.assert_array_equal(cut, corrected)
  assert (corrected != whole).any()
  before = sampling._programs.cache_info()
  again, _ = sampling.generate(model, params, key, 3, (8, 8, 1), num_steps=12)
  np.testing.assert_array_equal(again, whole)
  assert sampling._programs.cache_info().hits == before.hits + 1  # a second call compiles nothing new
  capsys.readouterr()
  sampling.generate(model, params, key, 3, (8, 8, 1), num_steps=120, batch_size=2, progress=True)
  err = capsys.readouterr().err
  assert "sample:" in err and "0/240" in err and "step/s" in err  # two batches × 120 steps
  assert "| 3/240" in err  # it moves call by call (⌈120/50⌉ = 3 steps), not batch by batch

"""The likelihood terms against float64 numpy references and closed forms."""

import numpy as np
import pytest
from scipy.special import logsumexp, ndtr

import jax
import jax.numpy as jnp
from vdm import losses

GAMMAS = [-15.0, -13.3, -8.0, -3.0, 0.0, 5.0, 9.0]
SHAPES = [(3, 28, 28, 1), (2, 8, 8, 3)]


def _data(shape, vocab_size, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, vocab_size, size=shape)
  x.flat[:2] = [0, vocab_size - 1]  # both open bins appear
  eps = rng.standard_normal(shape)
  return x, eps


def ref_encode(x, v):
  return 2.0 * (x.astype(np.float64) + 0.5) / v - 1.0


def ref_recon(x, eps, g, v):
  f = ref_encode(x, v)
  z = f + np.exp(g / 2) * eps
  values = ref_encode(np.arange(v), v)
  logits = -0.5 * np.exp(-g) * (z[..., None] - values) ** 2
  logp = np.take_along_axis(logits, x[..., None], -1)[..., 0] - logsumexp(logits, axis=-1)
  return -logp.reshape(len(x), -1).sum(1)


def ref_recon_cdf(x, eps, g, v):
  f = ref_encode(x, v)
  mean, std = f + np.exp(g / 2) * eps, np.exp(g / 2)
  lo = np.where(x == 0, -np.inf, (f - 1.0 / v - mean) / std)
  hi = np.where(x == v - 1, np.inf, (f + 1.0 / v - mean) / std)
  right = lo + hi > 0  # mirror into the left tail, where ndtr is accurate
  mass = np.where(right, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo))
  return -np.log(mass).reshape(len(x), -1).sum(1)


def ref_prior(x, g, v):
  f = ref_encode(x, v)
  var = 1.0 / (1.0 + np.exp(-g))
  kl = 0.5 * ((1.0 - var) * f**2 + var - np.log(var) - 1.0)
  return kl.reshape(len(x), -1).sum(1)


def test_encode_is_bin_centres():
  x = jnp.arange(256)
  f = losses.encode(x)
  np.testing.assert_allclose(f, ref_encode(np.arange(256), 256), rtol=0, atol=1e-7)
  assert f.dtype == jnp.float32 and f.min() > -1 and f.max() < 1
  np.testing.assert_allclose(jnp.diff(f), 2 / 256, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("vocab_size", [256, 5])
def test_reconstruction_loss_matches_float64(shape, vocab_size):
  x, eps = _data(shape, vocab_size)
  for g in GAMMAS:
    got = losses.reconstruction_loss(x, eps.astype(np.float32), g, vocab_size)
    want = ref_recon(x, eps, g, vocab_size)
    assert got.shape == (shape[0],) and got.dtype == jnp.float32
    # Measured: ≤ 8e-6 relative (2.2 nats at γ = −13.3, 1e-5 off); at γ = −15 both are exactly 0.
    np.testing.assert_allclose(got, want, rtol=5e-5, atol=1e-6, err_msg=f"gamma={g}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("vocab_size", [256, 5])
def test_reconstruction_loss_cdf_matches_float64(shape, vocab_size):
  x, eps = _data(shape, vocab_size, seed=1)
  for g in GAMMAS:
    got = losses.reconstruction_loss_cdf(x, eps.astype(np.float32), g, vocab_size)
    want = ref_recon_cdf(x, eps, g, vocab_size)
    # Measured: ≤ 1.7e-5 relative (at γ = 9); 1.3e-7 nats absolute where the loss is ~3e-5 (γ = −15).
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=f"gamma={g}")


@pytest.mark.parametrize("gamma", [-16.0, -13.3, -10.6])  # w = 2 e^{−γ/2}/256 ≥ 1.5: the windowed sum
def test_windowed_normaliser_equals_the_full_sum_in_float64(gamma):
  rng = np.random.default_rng(3)
  x = rng.integers(0, 256, size=(4, 16, 16, 3))
  x[0, :2, 0, 0] = [0, 255]
  eps = rng.standard_normal(x.shape) * 3
  eps[0, :2, 0, 0] = [-40.0, 40.0]  # z far outside [−1, 1]: the window sits at the edge of the range
  assert 2 * np.exp(-gamma / 2) / 256 >= losses._WINDOW_MIN_W
  with jax.enable_x64(True):
    loss = lambda g: losses.reconstruction_loss(x, jnp.asarray(eps), g, 256).sum()  # noqa: E731
    np.testing.assert_allclose(jax.jit(jax.vmap(lambda g: losses.reconstruction_loss(x, jnp.asarray(eps), g)))(
        jnp.array([gamma]))[0], ref_recon(x, eps, gamma, 256), rtol=1e-12, atol=1e-9)
    full = lambda g: jnp.sum(-0.5 * jnp.asarray(eps) ** 2 - losses._log_normaliser(  # noqa: E731
        jnp.asarray(x), jnp.asarray(eps), 2 / 256 * jnp.exp(-0.5 * g) * jnp.ones(x.shape), jnp.arange(256)))
    g = jnp.float64(gamma)
    np.testing.assert_allclose(jax.grad(loss)(g), -jax.grad(full)(g), rtol=1e-10)


def test_window_is_used_only_where_it_is_exact():
  """Per-example γ_0 straddling the threshold falls back to the full sum for the whole batch."""
  x, eps = _data((2, 8, 8, 1), 256)
  gammas = np.array([-13.3, -9.0])  # w = 5.9 and 0.7
  got = losses.reconstruction_loss(x, eps.astype(np.float32), gammas)
  want = [ref_recon(x[i:i + 1], eps[i:i + 1], g, 256)[0] for i, g in enumerate(gammas)]
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_reconstruction_loss_per_example_gamma():
  x, eps = _data((4, 6, 6, 2), 256)
  g = np.array([-13.3, -5.0, 0.0, 4.0])
  got = losses.reconstruction_loss(x, eps, g)
  want = np.concatenate([ref_recon(x[i:i + 1], eps[i:i + 1], g[i], 256) for i in range(4)])
  np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.parametrize("decoder", ["softmax", "cdf"])
@pytest.mark.parametrize("gamma_0", [-13.3, -6.0, 0.0, 5.0])
def test_decoders_are_normalised_and_agree_with_the_losses(decoder, gamma_0):
  x, eps = _data((2, 5, 5, 3), 256, seed=2)
  z = losses.encode(x) + np.exp(gamma_0 / 2) * eps
  log_probs = losses.decoder_log_probs(z, gamma_0, 256, decoder)  # [B, …, V]
  np.testing.assert_allclose(jnp.exp(log_probs).sum(-1), 1.0, atol=1e-6)  # measured ≤ 3.6e-7
  picked = -jnp.take_along_axis(log_probs, x[..., None], -1)[..., 0].reshape(2, -1).sum(1)
  loss_fn = losses.reconstruction_loss if decoder == "softmax" else losses.reconstruction_loss_cdf
  # Measured: ≤ 5e-5 relative (1.4e-6 nats of 0.04 for the softmax at γ_0 = −13.3), 4.6e-6 elsewhere.
  np.testing.assert_allclose(picked, loss_fn(x, eps, gamma_0), rtol=5e-5, atol=1e-5)


def test_unknown_decoder_is_refused():
  with pytest.raises(ValueError, match="unknown decoder 'nope'"):
    losses.decoder_log_probs(jnp.zeros((1, 2)), 0.0, 256, "nope")


@pytest.mark.parametrize("vocab_size", [256, 2])
def test_prior_loss_matches_float64(vocab_size):
  x, _ = _data((3, 8, 8, 3), vocab_size)
  for g in [-5.0, 0.0, 5.0, 8.0, 12.0]:
    got = losses.prior_loss(x, g, vocab_size)
    np.testing.assert_allclose(got, ref_prior(x, g, vocab_size), rtol=1e-4, err_msg=f"gamma={g}")


def test_prior_loss_at_large_gamma_is_accurate_where_float64_is():
  # At γ = 14, σ² − 1 − log σ² ≈ e^{−28}/2: the naive float32 formula is 0.
  x = np.full((1, 4), 127)  # f = −1/256: the α² f² term is tiny too
  g = 14.0
  w = np.exp(-g)
  want = 4 * 0.5 * (1 / 256) ** 2 * w / (1 + w) + 4 * 0.5 * (np.log1p(w) - w / (1 + w))
  np.testing.assert_allclose(losses.prior_loss(x, g), [want], rtol=1e-4)


def test_variance_gap_series_matches_float64():
  """σ² − 1 − log σ² at σ² = sigmoid(γ), both branches (series for e^{−γ} < 0.1), against float64.

  With w = e^{−γ}: log1p(w) − w/(1 + w), accurate in float64 to ~2e-16/w relative.
  """
  gamma = np.linspace(-5.0, 15.0, 2001).astype(np.float32)  # the reference at the same float32 γ
  w = np.exp(-gamma.astype(np.float64))
  want = np.log1p(w) - w / (1.0 + w)
  got = np.asarray(losses._one_plus_log_var_gap(jnp.asarray(gamma)), np.float64)
  np.testing.assert_allclose(got, want, rtol=5e-6)  # measured ≤ 2.8e-6 (direct branch near the switch)


def test_prior_kl_equals_monte_carlo_estimate():
  x, _ = _data((1, 4, 4, 1), 256)
  g = 1.5
  f = ref_encode(x, 256)
  alpha, sigma = np.sqrt(1 / (1 + np.exp(g))), np.sqrt(1 / (1 + np.exp(-g)))
  z = alpha * f + sigma * np.random.default_rng(3).standard_normal((200_000,) + f.shape[1:])
  # log q(z│x) − log N(z; 0, I), summed over dims.
  log_ratio = (-0.5 * ((z - alpha * f) / sigma) ** 2 - np.log(sigma) + 0.5 * z**2).reshape(len(z), -1).sum(1)
  mc, stderr = log_ratio.mean(), log_ratio.std() / np.sqrt(len(z))
  assert abs(float(losses.prior_loss(x, g)[0]) - mc) < 4 * stderr


def test_diffusion_losses_match_closed_forms():
  rng = np.random.default_rng(4)
  eps, eps_hat = rng.standard_normal((2, 3, 4, 4, 2))
  sq = ((eps - eps_hat) ** 2).reshape(3, -1).sum(1)
  np.testing.assert_allclose(losses.diffusion_loss(eps, eps_hat, 18.3), 0.5 * 18.3 * sq, rtol=1e-5)
  dg = np.array([1.0, 2.0, 3.0])
  np.testing.assert_allclose(losses.diffusion_loss(eps, eps_hat, dg), 0.5 * dg * sq, rtol=1e-5)
  g_t, g_s = np.array([-13.3, 0.0, 5.0]), np.array([-13.35, -0.01, 4.9])
  got = losses.diffusion_loss_discrete(eps, eps_hat, g_t, g_s, 1000)
  np.testing.assert_allclose(got, 0.5 * 1000 * np.expm1(g_t - g_s) * sq, rtol=1e-3)


def test_discrete_loss_tends_to_continuous_as_steps_grow():
  """E_i of the T-step loss → E_t of the continuous loss, same ε̂ function."""
  rng = np.random.default_rng(5)
  f = rng.uniform(-1, 1, (1, 6))
  eps = rng.standard_normal((1, 6))
  gamma = lambda t: -10.0 + 15.0 * t**2 + 2.0 * t  # noqa: E731  increasing on [0, 1]
  dgamma = lambda t: 30.0 * t + 2.0  # noqa: E731

  def terms(t):  # ε̂ is a fixed smooth function of (z_t, γ_t)
    g = gamma(t)[:, None]
    z = np.sqrt(1 / (1 + np.exp(g))) * f + np.sqrt(1 / (1 + np.exp(-g))) * eps
    return np.broadcast_to(eps, z.shape), 0.5 * z * np.tanh(g / 4)

  t = (np.arange(200_000) + 0.5) / 200_000  # midpoint rule for the integral
  continuous = float(jnp.mean(losses.diffusion_loss(*terms(t), dgamma(t))))
  errors = []
  for num_steps in [10, 100, 1000]:
    t_i = np.arange(1, num_steps + 1) / num_steps
    per_step = losses.diffusion_loss_discrete(*terms(t_i), gamma(t_i), gamma(t_i - 1 / num_steps),
                                              num_steps)
    errors.append(abs(float(jnp.mean(per_step)) - continuous))
  # O(1/T): each tenfold T cuts the gap about tenfold.
  assert errors[0] > 5 * errors[1] > 25 * errors[2]
  assert errors[2] < 2e-2 * continuous


def test_bits_per_dim():
  np.testing.assert_allclose(losses.bits_per_dim(784 * np.log(2.0), 784), 1.0, rtol=1e-6)
  np.testing.assert_allclose(losses.bits_per_dim(jnp.array([0.0, 2 * 3072 * np.log(2.0)]), 3072),
                             [0.0, 2.0], rtol=1e-6)


def test_losses_are_jittable_and_vmappable():
  x, eps = _data((2, 4, 4, 1), 256)
  jitted = jax.jit(losses.reconstruction_loss)(x, eps, -13.3)
  np.testing.assert_allclose(jitted, losses.reconstruction_loss(x, eps, -13.3), rtol=1e-6)
  mapped = jax.vmap(lambda xi, ei: losses.prior_loss(xi[None], 5.0)[0])(x, eps)
  np.testing.assert_allclose(mapped, losses.prior_loss(x, 5.0), rtol=1e-6)


def _decoder_log_probs_float64(z, gamma_0, v, decoder):
  """log p(v│z) in float64 numpy: the softmax of −½ (z − encode(v))² e^{−γ_0}, or the Gaussian's bin masses."""
  from scipy import special, stats
  values = ref_encode(np.arange(v), v)  # [V]
  inv_std = np.exp(-0.5 * gamma_0)
  if decoder == "softmax":
    logits = -0.5 * np.square((z[..., None] - values) * inv_std)
    return logits - special.logsumexp(logits, axis=-1, keepdims=True)
  lower = (values - 1.0 / v - z[..., None]) * inv_std
  upper = (values + 1.0 / v - z[..., None]) * inv_std
  lower[..., 0], upper[..., -1] = -np.inf, np.inf
  # log(Φ(u) − Φ(l)), computed on whichever side of the mean keeps it exact.
  upper_side = lower > 0
  hi = np.where(upper_side, stats.norm.logsf(lower), stats.norm.logcdf(upper))
  lo = np.where(upper_side, stats.norm.logsf(upper), stats.norm.logcdf(lower))
  return hi + np.log1p(-np.exp(lo - hi))


@pytest.mark.parametrize("decoder", ["softmax", "cdf"])
@pytest.mark.parametrize("gamma_0", [-13.3, -6.0, 0.0])
def test_decoder_log_probs_match_float64(decoder, gamma_0):
  rng = np.random.default_rng(3)
  v = 256
  x = rng.integers(0, v, (4, 5))
  z = ref_encode(x, v) + np.exp(0.5 * gamma_0) * rng.standard_normal(x.shape)  # z_0/α_0, some outside [−1, 1]
  want = _decoder_log_probs_float64(z, gamma_0, v, decoder)
  got = np.asarray(losses.decoder_log_probs(jnp.asarray(z, jnp.float32), gamma_0, v, decoder), np.float64)
  near = want > -30.0  # the values that carry probability: absolute agreement
  np.testing.assert_allclose(got[near], want[near], rtol=0, atol=2e-3 if gamma_0 < -10 else 2e-4)
  np.testing.assert_allclose(got[~near], want[~near], rtol=2e-3)  # far tails: relative
  np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, atol=1e-5)

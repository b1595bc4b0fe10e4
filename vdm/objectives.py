"""What the network predicts and how training weighs noise levels.

Two choices that change training but not what is evaluated: every
prediction is converted to ε̂, so the ELBO, the samplers and the bits/dim
keep their meaning; every weighting multiplies the ELBO's diffusion term
per example, and evaluation always reports the unweighted ELBO.

Written in λ = −γ = log SNR (Kingma & Gao 2023, "Understanding diffusion
objectives as the ELBO with simple data augmentation"). The continuous-time
diffusion term is ½ E_t[γ'(t) ‖ε − ε̂‖²] = ½ ∫ ‖ε − ε̂‖² dλ; a weighting
w(λ) makes it ½ E_t[w(λ_t) γ'(t) ‖ε − ε̂‖²]. w = 1 is the ELBO.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

PREDICTIONS = ("eps", "x", "v")
WEIGHTINGS = ("elbo", "sigmoid", "edm_monotone", "eps_mse")


def eps_from_prediction(output: ArrayLike, z_t: ArrayLike, gamma_t: ArrayLike, prediction: str) -> jax.Array:
  """ε̂ from the network's output, for z_t = α_t x + σ_t ε.

  ``"eps"``: the output is ε̂. ``"x"``: it is x̂, and ε̂ = (z_t − α x̂)/σ.
  ``"v"``: it is v̂ with v = α ε − σ x (Salimans & Ho 2022), and
  ε̂ = σ z_t + α v̂ (as α² + σ² = 1). α = √sigmoid(−γ), σ = √sigmoid(γ).

  Args:
    output, z_t: ``[B, …]``.
    gamma_t: scalar or ``[B]``.
  """
  output, z_t = jnp.asarray(output), jnp.asarray(z_t)
  if prediction == "eps":
    return output
  gamma = jnp.asarray(gamma_t, output.dtype)
  gamma = gamma.reshape(gamma.shape + (1,) * (output.ndim - gamma.ndim))
  alpha, sigma = jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))
  if prediction == "x":
    return (z_t - alpha * output) / sigma
  if prediction == "v":
    return sigma * z_t + alpha * output
  raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


# EDM's weighting (Karras et al. 2022) in λ, as Kingma & Gao write it: its noise-level density
# N(λ; 2.4, 2.4²) (log σ ~ N(−1.2, 1.2²)) times its loss weight in ε-space (e^{−λ} + σ_d²)/σ_d², σ_d = 0.5.
_EDM_MEAN, _EDM_STD, _EDM_SIGMA_DATA = 2.4, 2.4, 0.5


def _edm_log_weight(lam):
  return (-0.5 * ((lam - _EDM_MEAN) / _EDM_STD) ** 2
          + jnp.logaddexp(-lam, 2 * math.log(_EDM_SIGMA_DATA)) - 2 * math.log(_EDM_SIGMA_DATA))


def _edm_peak() -> float:
  """The λ where EDM's weighting peaks: d/dλ log w = 0, by bisection (the slope is + at −20, − at 20)."""
  slope = lambda lam: -(lam - _EDM_MEAN) / _EDM_STD**2 - 1.0 / (1.0 + _EDM_SIGMA_DATA**2 * np.exp(lam))  # noqa: E731
  lo, hi = -20.0, 20.0
  for _ in range(100):  # to float64's resolution
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
  return 0.5 * (lo + hi)


EDM_PEAK_LAMBDA = _edm_peak()


def loss_weight(weighting: str, gamma_t: ArrayLike, dgamma_dt: ArrayLike, gamma_0: ArrayLike,
                gamma_1: ArrayLike, sigmoid_bias: float = 2.0) -> jax.Array:
  """w(λ_t) per example (λ = −γ), no gradient; at most 1 except ``eps_mse``.

  * ``"elbo"``: 1.
  * ``"sigmoid"``: sigmoid(b − λ) (Kingma & Gao), b = ``sigmoid_bias``.
  * ``"edm_monotone"``: EDM's weighting in λ, held at its maximum for λ
    below its peak (so it never decreases with noise) and scaled to peak at 1.
  * ``"eps_mse"``: (γ_1 − γ_0)/γ'(t), which turns the term into
    ½ (γ_1 − γ_0) ‖ε − ε̂‖²: Ho et al.'s (2020) simple ε-MSE with t uniform
    under this schedule (with ``linear_beta``, theirs); equal to the ELBO
    for a linear schedule.
  """
  gamma_t = jnp.asarray(gamma_t, jnp.float32)
  if weighting == "elbo":
    w = jnp.ones_like(gamma_t)
  elif weighting == "sigmoid":
    w = jax.nn.sigmoid(sigmoid_bias + gamma_t)
  elif weighting == "edm_monotone":
    lam = jnp.maximum(-gamma_t, EDM_PEAK_LAMBDA)
    w = jnp.exp(_edm_log_weight(lam) - _edm_log_weight(EDM_PEAK_LAMBDA))
  elif weighting == "eps_mse":
    w = (jnp.asarray(gamma_1) - jnp.asarray(gamma_0)) / jnp.asarray(dgamma_dt)
  else:
    raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
  return jax.lax.stop_gradient(w)


# ---- Adaptive importance sampling of the noise level (Kingma & Gao 2023, appendix F) ----
#
# The diffusion term is E_{t~U(0,1)}[L(t)]. Drawing t from a density q instead and weighting each
# draw by 1/q(t) keeps the expectation, E_q[L/q] = E_U[L], and the variance is least for
# q ∝ √E[L(t)²]. K equal bins of t (so of λ = −γ(t), with edges λ(k/K)) hold an exponential moving
# average of L² per bin; q is piecewise constant, ∝ its square root, mixed with a uniform floor so
# every t keeps a chance.


def importance_probs(second_moment: ArrayLike, floor: float) -> jax.Array:
  """Bin probabilities ``[K]``: (1 − floor) √m / Σ√m + floor / K."""
  root = jnp.sqrt(jnp.maximum(jnp.asarray(second_moment, jnp.float32), 0.0))
  k = root.shape[0]
  return (1.0 - floor) * root / jnp.maximum(root.sum(), 1e-30) + floor / k


def importance_times(key: jax.Array, batch: int, probs: ArrayLike, antithetic: bool = True):
  """t ``[B]`` drawn from the piecewise-constant density of ``probs`` over K equal bins of [0, 1).

  Antithetic as :func:`vdm.model.sample_times`: one uniform shifts an even
  grid of the CDF, so the batch is stratified under q. Returns (t, q(t), bin).
  """
  probs = jnp.asarray(probs, jnp.float32)
  probs = probs / probs.sum()
  k = probs.shape[0]
  if antithetic:
    u = jnp.mod(jax.random.uniform(key, ()) + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
  else:
    u = jax.random.uniform(key, (batch,))
  cdf = jnp.concatenate([jnp.zeros(1, jnp.float32), jnp.cumsum(probs)])
  bins = jnp.clip(jnp.searchsorted(cdf, u, side="right") - 1, 0, k - 1)
  within = jnp.clip((u - cdf[bins]) / probs[bins], 0.0, 1.0 - 1e-7)
  return (bins + within) / k, probs[bins] * k, bins


def update_second_moment(second_moment: ArrayLike, bins: ArrayLike, loss: ArrayLike, decay: float) -> jax.Array:
  """The per-bin EMA of L² after one batch; bins without a draw keep their value."""
  second_moment = jnp.asarray(second_moment, jnp.float32)
  k = second_moment.shape[0]
  loss = jax.lax.stop_gradient(jnp.asarray(loss, jnp.float32))
  sums = jax.ops.segment_sum(jnp.square(loss), bins, num_segments=k)
  counts = jax.ops.segment_sum(jnp.ones_like(loss), bins, num_segments=k)
  mean = sums / jnp.maximum(counts, 1.0)
  return jnp.where(counts > 0, decay * second_moment + (1.0 - decay) * mean, second_moment)

"""Exact ε̂ of toy data distributions, for testing samplers and the ODE without a trained network.

Under the variance-preserving forward process z_t = α_t x + σ_t ε, the
optimal ε̂(z_t; γ_t) = (z_t − α_t E[x│z_t]) / σ_t.
"""

import jax
import jax.numpy as jnp


def point_mixture(points, weights=None):
  """The exact ε̂ for data that are a mixture of point masses ``points`` [K, D] (uniform by default)."""
  log_w = jnp.log(jnp.full(len(points), 1 / len(points)) if weights is None else jnp.asarray(weights))

  def eps_fn(z, gamma):
    alpha = jnp.sqrt(jax.nn.sigmoid(-gamma))[:, None]
    sigma_sq = jax.nn.sigmoid(gamma)[:, None]
    d = -0.5 * jnp.sum(jnp.square(z[:, None, :] - alpha[..., None] * points), -1) / sigma_sq
    post = jax.nn.softmax(d + log_w, axis=-1)  # [B, K]
    return (z - alpha * (post @ points)) / jnp.sqrt(sigma_sq)

  return eps_fn


def gaussian(mean, std):
  """Data x ~ N(mean, std²) per dimension: z_t ~ N(α_t mean, v_t), v_t = α_t² std² + σ_t², ε̂ = σ_t (z − α_t mean)/v_t."""
  mean, var = jnp.asarray(mean), jnp.square(jnp.asarray(std))

  def eps_fn(z, gamma):
    alpha_sq, sigma_sq = jax.nn.sigmoid(-gamma)[:, None], jax.nn.sigmoid(gamma)[:, None]
    return jnp.sqrt(sigma_sq) * (z - jnp.sqrt(alpha_sq) * mean) / (alpha_sq * var + sigma_sq)

  return eps_fn

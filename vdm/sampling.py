"""Sampling: one reverse step as a pure function, and whole samplers.

Steps go from t to s < t on the grid ``1 = t_N > … > t_0 = 0``. With
``c = −expm1(γ_s − γ_t) = 1 − SNR(t)/SNR(s)``:

* ancestral (paper appendix A.4, the posterior q(z_s│z_t, x̂)):
  ``z_s = √(α_s²/α_t²) (z_t − σ_t c ε̂) + √(σ_s² c) · noise``;
* DDIM (Song et al. 2021) with η ∈ [0, 1]: ``z_s = α_s x̂ + √(σ_s² − v) ε̂ +
  √v · noise`` with ``v = η² σ_s² c`` and ``x̂ = (z_t − σ_t ε̂)/α_t``; η = 0 is
  deterministic, η = 1 has the ancestral step's variance.

α² and σ² always come from ``sigmoid(∓γ)``, never ``1 − …``.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vdm import losses

SAMPLERS = ("ancestral", "ddim")


def _alpha_sq_sigma_sq(gamma: ArrayLike, ndim: int):
  gamma = losses._per_example(gamma, ndim)
  return jax.nn.sigmoid(-gamma), jax.nn.sigmoid(gamma)


def ancestral_step(z_t: ArrayLike, eps_hat: ArrayLike, gamma_t: ArrayLike, gamma_s: ArrayLike,
                   noise: ArrayLike) -> jax.Array:
  """One draw from q(z_s│z_t, x = x̂(z_t, ε̂)).

  Args:
    z_t: latents ``[B, …]`` at time t.
    eps_hat: predicted noise ``[B, …]``.
    gamma_t, gamma_s: γ at t and at s < t (scalars or ``[B]``).
    noise: standard normal ``[B, …]``.
  Returns:
    z_s ``[B, …]``.
  """
  z_t = jnp.asarray(z_t)
  alpha_sq_t, sigma_sq_t = _alpha_sq_sigma_sq(gamma_t, z_t.ndim)
  alpha_sq_s, sigma_sq_s = _alpha_sq_sigma_sq(gamma_s, z_t.ndim)
  c = -jnp.expm1(losses._per_example(gamma_s, z_t.ndim) - losses._per_example(gamma_t, z_t.ndim))
  mean = jnp.sqrt(alpha_sq_s / alpha_sq_t) * (z_t - jnp.sqrt(sigma_sq_t) * c * eps_hat)
  return mean + jnp.sqrt(sigma_sq_s * c) * noise


def ddim_step(z_t: ArrayLike, eps_hat: ArrayLike, gamma_t: ArrayLike, gamma_s: ArrayLike,
              eta: float = 0.0, noise: Optional[ArrayLike] = None) -> jax.Array:
  """One DDIM step; deterministic for η = 0 (the default).

  Args:
    z_t, eps_hat: ``[B, …]``.
    gamma_t, gamma_s: γ at t and at s < t (scalars or ``[B]``).
    eta: η ∈ [0, 1], the fraction of the posterior's standard deviation.
    noise: standard normal ``[B, …]``; needed when η > 0.
  Returns:
    z_s ``[B, …]``.
  """
  z_t = jnp.asarray(z_t)
  alpha_sq_t, sigma_sq_t = _alpha_sq_sigma_sq(gamma_t, z_t.ndim)
  alpha_sq_s, sigma_sq_s = _alpha_sq_sigma_sq(gamma_s, z_t.ndim)
  x_hat = (z_t - jnp.sqrt(sigma_sq_t) * eps_hat) / jnp.sqrt(alpha_sq_t)
  if noise is None:
    return jnp.sqrt(alpha_sq_s) * x_hat + jnp.sqrt(sigma_sq_s) * eps_hat
  c = -jnp.expm1(losses._per_example(gamma_s, z_t.ndim) - losses._per_example(gamma_t, z_t.ndim))
  var = jnp.square(eta) * sigma_sq_s * c
  # σ_s² − v = σ_s² (1 − η² c) ≥ 0 for η ≤ 1.
  direction = jnp.sqrt(sigma_sq_s * (1.0 - jnp.square(eta) * c))
  return jnp.sqrt(alpha_sq_s) * x_hat + direction * eps_hat + jnp.sqrt(var) * noise


def clip_eps_hat(z_t: ArrayLike, eps_hat: ArrayLike, gamma_t: ArrayLike) -> jax.Array:
  """The ε̂ whose implied x̂ = (z_t − σ_t ε̂)/α_t is clipped to [−1, 1]."""
  z_t = jnp.asarray(z_t)
  alpha_sq_t, sigma_sq_t = _alpha_sq_sigma_sq(gamma_t, z_t.ndim)
  alpha_t, sigma_t = jnp.sqrt(alpha_sq_t), jnp.sqrt(sigma_sq_t)
  x_hat = jnp.clip((z_t - sigma_t * eps_hat) / alpha_t, -1.0, 1.0)
  return (z_t - alpha_t * x_hat) / sigma_t


def decode(z_0: ArrayLike, gamma_0: ArrayLike, vocab_size: int = 256, decoder: str = "softmax",
           key: Optional[jax.Array] = None) -> jax.Array:
  """Integer images from z_0: the decoder's argmax, or a draw if ``key`` is given.

  Args:
    z_0: latents ``[B, …]`` at t = 0.
    gamma_0: γ(0).
    vocab_size: V.
    decoder: ``"softmax"`` or ``"cdf"``.
    key: PRNG key for a draw; None for the argmax.
  Returns:
    int32 ``[B, …]`` in {0, …, V−1}.
  """
  z_0 = jnp.asarray(z_0)
  alpha_sq_0, _ = _alpha_sq_sigma_sq(gamma_0, z_0.ndim)
  log_probs = losses.decoder_log_probs(z_0 / jnp.sqrt(alpha_sq_0), gamma_0, vocab_size, decoder)
  if key is None:
    return jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, log_probs, axis=-1).astype(jnp.int32)


def sample_loop(eps_fn: Callable[[jax.Array, jax.Array], jax.Array],
                gamma_fn: Callable[[jax.Array], jax.Array], z_1: jax.Array,
                sample_keys: jax.Array, num_steps: int, *, sampler: str = "ancestral",
                eta: float = 1.0, clip_denoised: bool = False) -> jax.Array:
  """Runs the reverse process from z_1 to z_0 in one ``lax.fori_loop``.

  Args:
    eps_fn: (z_t ``[B, …]``, γ_t ``[B]``) → ε̂ ``[B, …]``.
    gamma_fn: t ``[K]`` → γ ``[K]``.
    z_1: ``[B, …]`` draws from N(0, I).
    sample_keys: ``[B]`` keys, one per sample (the caller folds the sample
      index in, so a sample does not depend on its batch); step i folds in i.
    num_steps: N, steps on the grid t_i = i/N.
    sampler: ``"ancestral"`` or ``"ddim"``.
    eta: DDIM's η (ignored by the ancestral sampler).
    clip_denoised: clip x̂ to [−1, 1] inside every step.
  Returns:
    z_0 ``[B, …]``.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
  batch, shape = z_1.shape[0], z_1.shape[1:]

  def body(i, z_t):
    step = num_steps - i  # N, …, 1
    t = jnp.full((batch,), step / num_steps, jnp.float32)
    s = jnp.full((batch,), (step - 1) / num_steps, jnp.float32)
    gamma_t, gamma_s = gamma_fn(t), gamma_fn(s)
    eps_hat = eps_fn(z_t, gamma_t)
    if clip_denoised:
      eps_hat = clip_eps_hat(z_t, eps_hat, gamma_t)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape))(sample_keys)
    if sampler == "ancestral":
      return ancestral_step(z_t, eps_hat, gamma_t, gamma_s, noise)
    return ddim_step(z_t, eps_hat, gamma_t, gamma_s, eta, noise)

  return jax.lax.fori_loop(0, num_steps, body, z_1)

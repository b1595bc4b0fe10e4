"""The VDM objective as pure functions on arrays (Kingma et al. 2021, §3–4).

Every loss is per example, shape ``[B]``, in nats; reduction and the
conversion to bits per dimension are separate steps. ``x`` holds integers in
``{0, …, vocab_size − 1}`` with any trailing shape (``[B, H, W, C]`` for
images). Nothing here knows about Flax or the network.

Numerics: with γ_0 ≈ −13.3, σ_0² ≈ 1.7e−6, so α and σ are always formed
from ``sigmoid(±γ)`` / ``log_sigmoid`` / ``expm1``, never from ``1 − …``.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr
from jax.typing import ArrayLike
import numpy as np


def _float_dtype(x):
  return jnp.result_type(float) if jnp.issubdtype(x.dtype, jnp.integer) else x.dtype


def _per_example(gamma: ArrayLike, ndim: int) -> jax.Array:
  """Reshapes a scalar or ``[B]`` γ so it broadcasts against ``[B, …]`` data."""
  gamma = jnp.asarray(gamma)
  return gamma.reshape(gamma.shape + (1,) * (ndim - gamma.ndim))


def _sum_per_example(values: jax.Array) -> jax.Array:
  return jnp.sum(values, axis=tuple(range(1, values.ndim)))  # [B]


def encode(x: ArrayLike, vocab_size: int = 256) -> jax.Array:
  """Maps integers ``x`` in ``{0, …, V−1}`` to bin centres ``2 (x + ½)/V − 1``.

  Args:
    x: integer array, any shape.
    vocab_size: number of values V.
  Returns:
    float array shaped like ``x``, values in (−1, 1).
  """
  x = jnp.asarray(x)
  x = x.astype(_float_dtype(x))
  return (x + 0.5) * (2.0 / vocab_size) - 1.0


def decoder_log_probs(z_0_rescaled: ArrayLike, gamma_0: ArrayLike, vocab_size: int = 256,
                      decoder: str = "softmax") -> jax.Array:
  """log p(v│z_0) for every value v: the decoder as a distribution (appendix B).

  Args:
    z_0_rescaled: ``z_0 / α_0``, float ``[B, …]``.
    gamma_0: γ(0), scalar or ``[B]``.
    vocab_size: V.
    decoder: ``"softmax"`` (the paper's: logits ``−½ (z_0/α_0 − encode(v))²
      e^{−γ_0}``) or ``"cdf"`` (mass of N(z_0/α_0, e^{γ_0}) over each bin
      ``encode(v) ± 1/V``, outer bins open).
  Returns:
    normalised log-probabilities ``[B, …, V]``.
  """
  z = jnp.asarray(z_0_rescaled)
  gamma_0 = _per_example(gamma_0, z.ndim)[..., None].astype(z.dtype)
  values = encode(jnp.arange(vocab_size), vocab_size).astype(z.dtype)  # [V]
  inv_std = jnp.exp(-0.5 * gamma_0)
  if decoder == "softmax":
    return jax.nn.log_softmax(-0.5 * jnp.square((z[..., None] - values) * inv_std), axis=-1)
  if decoder == "cdf":
    lower = (values - 1.0 / vocab_size - z[..., None]) * inv_std
    upper = (values + 1.0 / vocab_size - z[..., None]) * inv_std
    v = jnp.arange(vocab_size)
    return jnp.where(v == 0, log_ndtr(upper),
                     jnp.where(v == vocab_size - 1, log_ndtr(-lower), _log_bin_mass(lower, upper)))
  raise ValueError(f"unknown decoder {decoder!r}; expected one of ('softmax', 'cdf')")


def reconstruction_loss(x: ArrayLike, eps_0: ArrayLike, gamma_0: ArrayLike,
                        vocab_size: int = 256) -> jax.Array:
  """−log p(x│z_0) with the paper's categorical decoder, in nats.

  ``z_0 / α_0 = encode(x) + e^{γ_0/2} ε_0``; each dimension is a softmax over
  the V values with Gaussian logits (see :func:`decoder_log_probs`).

  Args:
    x: integer data ``[B, …]``.
    eps_0: standard normal noise shaped like ``x``.
    gamma_0: γ(0), scalar or ``[B]``.
    vocab_size: V.
  Returns:
    ``[B]`` nats.
  """
  x = jnp.asarray(x)
  eps_0 = jnp.asarray(eps_0)
  gamma_0 = _per_example(gamma_0, x.ndim).astype(eps_0.dtype)
  # z_0/α_0 − encode(v) = 2 (x − v)/V + e^{γ_0/2} ε_0 exactly, so in units of
  # the decoder's std e^{γ_0/2} each logit is −½ (ε_0 + (x − v) w)² with
  # w = 2 e^{−γ_0/2}/V: no large-minus-large cancellation at γ_0 ≈ −13.
  w = (2.0 / vocab_size) * jnp.exp(-0.5 * gamma_0)
  x = x.astype(jnp.int32)
  # Decided on γ_0 itself (a scalar in the model), not on the [B, …] broadcast of it,
  # so that a batch sharded over devices needs no collective for the decision.
  use_window = jnp.all(w >= _WINDOW_MIN_W)
  log_z = _decoder_log_normaliser(x, eps_0, jnp.broadcast_to(w, x.shape).astype(eps_0.dtype), use_window,
                                  vocab_size)
  # The true value's logit (offset 0) is −½ ε_0².
  log_prob = -0.5 * jnp.square(eps_0) - log_z
  return -_sum_per_example(log_prob)  # [B]


# The softmax decoder's normaliser Σ_v exp(−½ (ε_0 + (x − v) w)²) is a sum over
# all V values, a [B, H, W, C, V] expression. Every value more than K from the
# most likely one lies at least (K + ½) w from the peak, so when w is large —
# γ_0 < −10.5, the regime VDMs train in (γ_0 ≈ −13.3: w ≈ 6) — those terms add
# less than e^{−½ ((K + ½) w_min)²} ≈ 1e−10 of the sum and only 2K + 1 values
# are summed; otherwise all V are.
_WINDOW = 4
_WINDOW_MIN_W = 1.5


def _log_normaliser(x: jax.Array, eps_0: jax.Array, w: jax.Array, values: jax.Array,
                    with_grads: bool = False):
  """log Σ_v exp(−½ (ε_0 + (x − v) w)²) over ``values`` ([V] or [..., K]).

  With ``with_grads``, also its derivatives with respect to ε_0 and w.
  """
  r = eps_0[..., None] + (x[..., None] - values).astype(eps_0.dtype) * w[..., None]  # [..., K]
  log_z = jax.nn.logsumexp(-0.5 * jnp.square(r), axis=-1)
  if not with_grads:
    return log_z
  p = jnp.exp(-0.5 * jnp.square(r) - log_z[..., None])
  d_eps = -jnp.sum(p * r, axis=-1)
  d_w = -jnp.sum(p * r * (x[..., None] - values).astype(eps_0.dtype), axis=-1)
  return log_z, d_eps, d_w


def _window(x, eps_0, w, vocab_size):
  """The 2K + 1 values around the most likely one, v* = round(x + ε_0 / w), kept inside [0, V)."""
  centre = jnp.clip(jnp.round(x + eps_0 / w), _WINDOW, vocab_size - 1 - _WINDOW).astype(jnp.int32)
  return centre[..., None] + jnp.arange(-_WINDOW, _WINDOW + 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _decoder_log_normaliser(x, eps_0, w, use_window, vocab_size):
  """:func:`_log_normaliser` over all V values, summing only the window where that is exact.

  The choice is a ``lax.cond`` on ``use_window`` (traced: γ_0 is learned). Its derivative is written
  out: differentiating through the cond would keep the [..., V] residuals of
  the branch not taken, which costs as much as the full sum.
  """
  return _decoder_log_normaliser_fwd(x, eps_0, w, use_window, vocab_size)[0]


def _decoder_log_normaliser_fwd(x, eps_0, w, use_window, vocab_size):
  full = lambda: _log_normaliser(x, eps_0, w, jnp.arange(vocab_size), with_grads=True)  # noqa: E731
  if vocab_size <= 2 * _WINDOW + 1:
    log_z, d_eps, d_w = full()
  else:
    windowed = lambda: _log_normaliser(x, eps_0, w, _window(x, eps_0, w, vocab_size), with_grads=True)  # noqa: E731
    log_z, d_eps, d_w = jax.lax.cond(use_window, windowed, full)
  return log_z, (x, d_eps, d_w)


def _decoder_log_normaliser_bwd(vocab_size, residuals, g):
  x, d_eps, d_w = residuals
  zero = lambda shape: np.zeros(shape, jax.dtypes.float0)  # noqa: E731  integer and bool inputs
  return zero(x.shape), g * d_eps, g * d_w, zero(())


_decoder_log_normaliser.defvjp(_decoder_log_normaliser_fwd, _decoder_log_normaliser_bwd)


def _log_bin_mass(lower: jax.Array, upper: jax.Array) -> jax.Array:
  """log(Φ(upper) − Φ(lower)) for standardised bounds, without cancellation.

  Bins right of the mean use the mirror image Φ(−lower) − Φ(−upper), so both
  branches subtract in the left tail where ``log_ndtr`` is accurate.
  """
  right = (lower + upper) > 0
  a = jnp.where(right, -upper, lower)
  b = jnp.where(right, -lower, upper)
  log_b = log_ndtr(b)
  return log_b + jnp.log(-jnp.expm1(log_ndtr(a) - log_b))


def reconstruction_loss_cdf(x: ArrayLike, eps_0: ArrayLike, gamma_0: ArrayLike,
                            vocab_size: int = 256) -> jax.Array:
  """−log p(x│z_0) with the discretised-Gaussian decoder, in nats.

  p(x│z_0) is the mass of N(z_0/α_0, e^{γ_0}) over the bin
  ``encode(x) ± 1/V``; the bins of 0 and V−1 are open to −∞ and +∞.

  Args:
    x: integer data ``[B, …]``.
    eps_0: standard normal noise shaped like ``x``.
    gamma_0: γ(0), scalar or ``[B]``.
    vocab_size: V.
  Returns:
    ``[B]`` nats.
  """
  x = jnp.asarray(x)
  f = encode(x, vocab_size)
  gamma_0 = _per_example(gamma_0, f.ndim)
  # Standardised distance from the decoder mean f + e^{γ/2} ε to the bin
  # centre f is exactly −ε; the half-width 1/V is e^{−γ/2}/V in std units.
  half_width = jnp.exp(-0.5 * gamma_0) / vocab_size
  lower = -eps_0 - half_width
  upper = -eps_0 + half_width
  log_mass = jnp.where(
      x == 0, log_ndtr(upper),
      jnp.where(x == vocab_size - 1, log_ndtr(-lower), _log_bin_mass(lower, upper)))
  return -_sum_per_example(log_mass)  # [B]


def _one_plus_log_var_gap(gamma_1: jax.Array) -> jax.Array:
  """σ² − 1 − log σ² at σ² = sigmoid(γ), accurate for large γ.

  Equals softplus(−γ) − sigmoid(−γ) = log1p(w) − w/(1 + w) with w = e^{−γ}.
  For small w both terms are ≈ w and their difference ≈ w²/2: float32 loses
  about 2.4e-7/w of it (2.4e-5 at w = 0.01), so below w = 0.1 the series
  Σ_{k≥2} (−1)^k (k−1)/k w^k (to k = 8; truncation ≤ 1.8 w⁷ relative)
  replaces the difference. Worst case ~2.4e-6 relative, at the switch.
  """
  w = jnp.exp(-gamma_1)
  series = w * w * (1 / 2 + w * (-2 / 3 + w * (3 / 4 + w * (-4 / 5 + w * (5 / 6 + w * (-6 / 7 + w * (7 / 8)))))))
  direct = jax.nn.softplus(-gamma_1) - jax.nn.sigmoid(-gamma_1)
  return jnp.where(w < 0.1, series, direct)


def prior_loss(x: ArrayLike, gamma_1: ArrayLike, vocab_size: int = 256) -> jax.Array:
  """KL(q(z_1│x) ‖ N(0, I)) in nats.

  ``½ Σ (α_1² f² + σ_1² − log σ_1² − 1)`` with ``f = encode(x)``.

  Args:
    x: integer data ``[B, …]``.
    gamma_1: γ(1), scalar or ``[B]``.
    vocab_size: V.
  Returns:
    ``[B]`` nats.
  """
  f = encode(x, vocab_size)
  gamma_1 = _per_example(gamma_1, f.ndim).astype(f.dtype)
  alpha_sq = jax.nn.sigmoid(-gamma_1)
  kl = 0.5 * (alpha_sq * jnp.square(f) + _one_plus_log_var_gap(gamma_1))
  return _sum_per_example(jnp.broadcast_to(kl, f.shape))  # [B]


def diffusion_loss(eps: ArrayLike, eps_hat: ArrayLike, dgamma_dt: ArrayLike) -> jax.Array:
  """Continuous-time diffusion loss (T = ∞), eq. (17) of the paper, one draw.

  ``½ γ'(t) ‖ε − ε̂(z_t; γ_t)‖²``.

  Args:
    eps: the noise used to form z_t, ``[B, …]``.
    eps_hat: the network's prediction, ``[B, …]``.
    dgamma_dt: γ'(t), scalar or ``[B]``.
  Returns:
    ``[B]`` nats.
  """
  eps = jnp.asarray(eps)
  sq = _sum_per_example(jnp.square(eps - jnp.asarray(eps_hat, eps.dtype)))
  return 0.5 * jnp.asarray(dgamma_dt) * sq


def diffusion_loss_discrete(eps: ArrayLike, eps_hat: ArrayLike, gamma_t: ArrayLike,
                            gamma_s: ArrayLike, num_steps: int) -> jax.Array:
  """Discrete-time diffusion loss with T steps, eq. (13), one draw of i.

  ``½ T (e^{γ_t − γ_s} − 1) ‖ε − ε̂(z_t; γ_t)‖²`` with ``s = t − 1/T``.

  Args:
    eps, eps_hat: ``[B, …]``.
    gamma_t, gamma_s: γ at t and s, scalar or ``[B]``.
    num_steps: T.
  Returns:
    ``[B]`` nats.
  """
  eps = jnp.asarray(eps)
  sq = _sum_per_example(jnp.square(eps - jnp.asarray(eps_hat, eps.dtype)))
  # expm1: γ_t − γ_s is O(1/T), so exp(·) − 1 would cancel.
  weight = jnp.expm1(jnp.asarray(gamma_t) - jnp.asarray(gamma_s))
  return 0.5 * num_steps * weight * sq


def bits_per_dim(nats: ArrayLike, num_dims: int) -> jax.Array:
  """Converts nats per example to bits per dimension."""
  return jnp.asarray(nats) / (num_dims * math.log(2.0))

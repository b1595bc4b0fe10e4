"""Noise schedules γ(t) = log(σ_t²/α_t²) as Flax modules.

Each module maps times ``t`` (scalar or ``[B]``, in [0, 1]) to γ of the same
shape, strictly increasing in t, from γ(0) = ``gamma_min`` to γ(1) =
``gamma_max``. Learned schedules keep their endpoints as two parameters,
``gamma_min`` and ``gamma_max``, that γ(0) and γ(1) equal exactly however
training moves the rest. The span is taken as ``|gamma_max − gamma_min|``
(as the paper's code takes |w|), so γ increases by construction even if an
update were to cross the two; while ``gamma_max > gamma_min``, as the
ELBO's gradients keep them (the reconstruction term lowers γ(0), the prior
term raises γ(1)), that is the plain difference, gradients included.

γ'(t), which the continuous-time loss needs, is taken with ``jax.jvp`` by the
caller; nothing here differentiates.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def _endpoint(module: nn.Module, name: str, value: float) -> jax.Array:
  return module.param(name, nn.initializers.constant(value), ())


class FixedLinear(nn.Module):
  """γ(t) = γ_min + (γ_max − γ_min) t, nothing learned."""
  gamma_min: float = -13.3
  gamma_max: float = 5.0

  def __call__(self, t: ArrayLike) -> jax.Array:
    t = jnp.asarray(t, jnp.float32)
    return self.gamma_min + (self.gamma_max - self.gamma_min) * t


class LearnedLinear(nn.Module):
  """γ(t) = γ_0 + |γ_1 − γ_0| t with both endpoints trained (paper §4)."""
  gamma_min: float = -13.3
  gamma_max: float = 5.0

  @nn.compact
  def __call__(self, t: ArrayLike) -> jax.Array:
    gamma_0 = _endpoint(self, "gamma_min", self.gamma_min)
    gamma_1 = _endpoint(self, "gamma_max", self.gamma_max)
    t = jnp.asarray(t, jnp.float32)
    return gamma_0 + jnp.abs(gamma_1 - gamma_0) * t


class _MonotoneDense(nn.Module):
  """Dense layer with positive weights softplus(w): increasing in its input."""
  in_features: int
  features: int

  def setup(self):
    self.kernel = self.param("kernel", nn.initializers.normal(1.0), (self.in_features, self.features))
    self.bias = self.param("bias", nn.initializers.zeros, (self.features,))

  def weights(self) -> tuple[jax.Array, jax.Array]:
    return jax.nn.softplus(self.kernel), self.bias

  def __call__(self, h: jax.Array) -> jax.Array:
    w, b = self.weights()
    return h @ w + b


@jax.custom_vjp
def route_to_variance(unit: jax.Array, slope: jax.Array):
  """Identity on (u, u'), plus a zero ``probe``; the gradient reaching u, u' is scaled by the probe's.

  The continuous-time ELBO depends on a schedule's interior only through
  its endpoints in expectation (paper §5), so its interior is learned by
  minimising the variance of the diffusion loss L instead (paper appendix
  I.2): with E[L] independent of the interior η, ∇_η Var[L] = E[2 L ∇_η L].
  The training loss adds ``Σ_b probe_b · stop_gradient(L_b / mean L)``
  (zero in value); the cotangent reaching ``probe_b`` is then that factor,
  and the backward pass multiplies the cotangent of example b's u, u' by
  it. So η receives ∇_η E[L²] / (2 E[L]) (the variance's gradient in the
  ELBO's own units) in the same backward pass, while the endpoints and the
  network receive the ELBO's gradient unchanged.
  """
  return unit, slope, jnp.zeros_like(unit)


def _route_fwd(unit, slope):
  return route_to_variance(unit, slope), None


def _route_bwd(_, cotangents):
  d_unit, d_slope, d_probe = cotangents
  return d_unit * d_probe, d_slope * d_probe


route_to_variance.defvjp(_route_fwd, _route_bwd)


class MonotoneNet(nn.Module):
  """The paper's monotone "SNR network" (appendix H), pinned to its endpoints.

  ``g(t) = l1(t) + l3(sigmoid(l2(l1(t))))`` with positive weights is
  increasing; ``u(t) = (g(t) − g(0)) / (g(1) − g(0))`` runs exactly from 0
  to 1 and is scaled onto the trained endpoints: γ(t) = γ_min + |γ_max −
  γ_min| u(t). The endpoints are learned by the ELBO; the interior (l1, l2,
  l3) by minimising the diffusion loss's variance (:meth:`with_slope`,
  :func:`route_to_variance`), which the ELBO leaves without a gradient in
  expectation.
  """
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  hidden: int = 1024

  def setup(self):
    self.gamma_0 = _endpoint(self, "gamma_min", self.gamma_min)
    self.gamma_1 = _endpoint(self, "gamma_max", self.gamma_max)
    self.l1 = _MonotoneDense(1, 1)
    self.l2 = _MonotoneDense(1, self.hidden)
    self.l3 = _MonotoneDense(self.hidden, 1)

  def _g(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """g(t) and g'(t) for t ``[N]``, the derivative in closed form."""
    (w1, b1), (w2, b2), (w3, b3) = self.l1.weights(), self.l2.weights(), self.l3.weights()
    h = t[:, None] * w1[0, 0] + b1  # l1(t), [N, 1]
    s = jax.nn.sigmoid(h @ w2 + b2)  # [N, H]
    g = h[:, 0] + s @ w3[:, 0] + b3[0]
    dg = w1[0, 0] * (1.0 + (s * (1.0 - s)) @ (w2[0] * w3[:, 0]))
    return g, dg

  def unit(self, t: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """u(t) ∈ [0, 1] (exactly 0 at t = 0 and 1 at t = 1) and u'(t), shaped like t."""
    t = jnp.asarray(t, jnp.float32)
    # Evaluate t, 0 and 1 in one batch so the normalisation is exact.
    g, dg = self._g(jnp.concatenate([t.reshape(-1), jnp.array([0.0, 1.0], jnp.float32)]))
    span = g[-1] - g[-2]
    return ((g[:-2] - g[-2]) / span).reshape(t.shape), (dg[:-2] / span).reshape(t.shape)

  def __call__(self, t: ArrayLike) -> jax.Array:
    return self.gamma_0 + jnp.abs(self.gamma_1 - self.gamma_0) * self.unit(t)[0]

  def with_slope(self, t: ArrayLike, minimize_variance: bool = False):
    """(γ(t), γ'(t), probe): with ``minimize_variance``, gradients to the interior go through
    :func:`route_to_variance` and ``probe`` (zeros) must enter the loss as it says."""
    unit, slope = self.unit(t)
    if minimize_variance:
      unit, slope, probe = route_to_variance(unit, slope)
    else:
      probe = jnp.zeros_like(unit)
    span = jnp.abs(self.gamma_1 - self.gamma_0)
    return self.gamma_0 + span * unit, span * slope, probe


class _ReparameterisedFixed(nn.Module):
  """A fixed curve γ_b(τ), with τ affine in t so γ(0)=γ_min and γ(1)=γ_max.

  Subclasses give γ_b in closed form (in-graph, float32) and its inverse
  (float64 numpy, at construction). The inverse places τ_0, τ_1; an affine
  correction removes the last float32 rounding so the endpoints are exact.
  """
  gamma_min: float = -13.3
  gamma_max: float = 5.0

  def base_gamma(self, tau: jax.Array) -> jax.Array:
    raise NotImplementedError

  def base_tau(self, gamma: float) -> float:
    raise NotImplementedError

  def __call__(self, t: ArrayLike) -> jax.Array:
    t = jnp.asarray(t, jnp.float32)
    tau_0, tau_1 = self.base_tau(self.gamma_min), self.base_tau(self.gamma_max)
    ends = self.base_gamma(jnp.array([tau_0, tau_1], jnp.float32))
    g = self.base_gamma(tau_0 + (tau_1 - tau_0) * t)
    unit = (g - ends[0]) / (ends[1] - ends[0])
    return self.gamma_min + (self.gamma_max - self.gamma_min) * unit


class LinearBeta(_ReparameterisedFixed):
  """DDPM's linear β(τ) = β_0 + (β_1 − β_0) τ in continuous time.

  ᾱ(τ) = exp(−B(τ)) with B(τ) = β_0 τ + ½ (β_1 − β_0) τ², so
  γ_b(τ) = log(e^{B} − 1) = B + log(−expm1(−B)).
  """
  beta_0: float = 0.1
  beta_1: float = 20.0

  def base_gamma(self, tau):
    big_b = self.beta_0 * tau + 0.5 * (self.beta_1 - self.beta_0) * jnp.square(tau)
    return big_b + jnp.log(-jnp.expm1(-big_b))

  def base_tau(self, gamma):
    big_b = np.logaddexp(0.0, gamma)  # B = log(1 + e^γ)
    slope = self.beta_1 - self.beta_0
    return float((-self.beta_0 + np.sqrt(self.beta_0**2 + 2.0 * slope * big_b)) / slope)


class Cosine(_ReparameterisedFixed):
  """Nichol & Dhariwal's cosine schedule ᾱ(τ) = cos²(a(τ)) / cos²(a(0)).

  With a(τ) = π/2 (τ + s)/(1 + s): σ² = sin(a − a_0) sin(a + a_0)/cos²(a_0),
  so γ_b(τ) = log sin(a − a_0) + log sin(a + a_0) − 2 log cos(a), with
  a − a_0 = π/2 τ/(1 + s) formed directly (no cancellation near τ = 0).
  """
  s: float = 0.008

  def base_gamma(self, tau):
    scale = 0.5 * math.pi / (1.0 + self.s)
    a_0 = scale * self.s
    d = scale * tau
    return jnp.log(jnp.sin(d)) + jnp.log(jnp.sin(d + 2 * a_0)) - 2.0 * jnp.log(jnp.cos(d + a_0))

  def base_tau(self, gamma):
    scale = 0.5 * math.pi / (1.0 + self.s)
    a_0 = scale * self.s
    # cos(a) = cos(a_0) √ᾱ with ᾱ = sigmoid(−γ).
    a = np.arccos(np.cos(a_0) * np.sqrt(1.0 / (1.0 + np.exp(gamma))))
    return float((a - a_0) / scale)


SCHEDULES = {
    "fixed_linear": FixedLinear,
    "learned_linear": LearnedLinear,
    "monotone_net": MonotoneNet,
    "linear_beta": LinearBeta,
    "cosine": Cosine,
}
# The fixed curves between γ_min and γ_max (steep at their ends): evaluation's "auto" γ path is linear for these.
CURVED_FIXED = tuple(name for name, cls in SCHEDULES.items() if issubclass(cls, _ReparameterisedFixed))


def get_schedule(name: str, gamma_min: float, gamma_max: float, **kwargs) -> nn.Module:
  """Builds the schedule called ``name``; raises ValueError for unknown names."""
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; expected one of {tuple(SCHEDULES)}")
  if not gamma_min < gamma_max:
    raise ValueError(f"gamma_min ({gamma_min}) must be < gamma_max ({gamma_max})")
  return SCHEDULES[name](gamma_min=gamma_min, gamma_max=gamma_max, **kwargs)

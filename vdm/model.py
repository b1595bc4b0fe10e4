"""The variational diffusion model: schedule + score network + decoder.

:class:`VDM` returns the per-example terms of the negative ELBO (paper eq. 11),
in nats, for integer data ``x`` ``[B, …]``. The math lives in
:mod:`vdm.losses`; this module only draws the randomness (from explicit keys)
and wires γ and ε̂ into it.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm import losses, objectives

# The decoder p(x│z_0)'s reconstruction loss −log p(x│z_0) of each ``model.decoder``: (x, ε_0, γ_0, V) → [B] nats.
RECONSTRUCTION_LOSSES = {"softmax": losses.reconstruction_loss, "cdf": losses.reconstruction_loss_cdf}
DECODERS = tuple(RECONSTRUCTION_LOSSES)
# How t ~ U(0, 1) maps to γ in the continuous-time diffusion term; see VDM.gamma_path.
GAMMA_PATHS = ("schedule", "linear")


def sample_times(key: jax.Array, batch: int, antithetic: bool = True) -> jax.Array:
  """Times t ``[B]`` in [0, 1).

  Antithetic (low-discrepancy, paper appendix I.1): one uniform u shifts the
  evenly spaced grid, ``t_b = (u + b/B) mod 1``; every t is still uniform but
  the batch covers [0, 1) evenly, lowering the estimator's variance.
  """
  if antithetic:
    u = jax.random.uniform(key, ())
    return jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
  return jax.random.uniform(key, (batch,))


def draw_noise(key: jax.Array, shape: tuple, antithetic: bool = True) -> dict[str, jax.Array]:
  """The randomness of one loss evaluation for data of ``shape`` ``[B, …]``.

  Returns ``t`` ``[B]``, ``eps`` and ``eps_0`` shaped like the data. Drawing
  it apart from the loss lets a batch be split into micro-batches (gradient
  accumulation) and still see exactly the same noise.
  """
  key_t, key_eps, key_eps_0 = jax.random.split(key, 3)
  return {"t": sample_times(key_t, shape[0], antithetic), "eps": jax.random.normal(key_eps, shape),
          "eps_0": jax.random.normal(key_eps_0, shape)}


def alpha_sigma(gamma: jax.Array) -> tuple[jax.Array, jax.Array]:
  """α = √sigmoid(−γ), σ = √sigmoid(γ): α² + σ² = 1 without cancellation."""
  return jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))


class VDM(nn.Module):
  """Negative ELBO of a VDM, per example.

  Attributes:
    schedule: a module t → γ(t) from :mod:`vdm.schedules`.
    network: a module (z_t, γ_t, conditioning, train=) → ε̂ from :mod:`vdm.networks`.
    vocab_size: V, the number of values each dimension takes.
    num_steps: T for the discrete-time loss; 0 for continuous time.
    antithetic_time_sampling: low-discrepancy t (default) or plain uniform.
    decoder: ``"softmax"`` (the paper's) or ``"cdf"``.
    prediction: what the network outputs, ``"eps"``, ``"x"`` or ``"v"``
      (:func:`vdm.objectives.eps_from_prediction`); :meth:`eps_hat` is ε̂ in every case.
    loss_weighting: w(λ) of the diffusion term in training
      (:func:`vdm.objectives.loss_weight`), returned as ``loss_weight``;
      ``loss_diff`` is always the ELBO's. ``sigmoid_bias``: b of ``"sigmoid"``.
    minimize_variance: in continuous-time training, a schedule with an
      interior (``with_slope``, e.g. ``monotone_net``) learns it by
      minimising the diffusion loss's variance (paper appendix I.2); the
      output ``variance_probe`` must then enter the training loss as
      :func:`vdm.schedules.route_to_variance` says.
    num_classes: K > 0 for a class-conditional model; label K is the null
      class (no label), which classifier-free guidance contrasts with.
    label_dropout: the share of training labels replaced by the null class
      (:func:`vdm.guidance.drop_labels`, applied by the training step).
    gamma_path: how the continuous-time diffusion term ½ ∫ ‖ε − ε̂‖² dγ is
      estimated from t ~ U(0, 1): "schedule" (γ = γ(t), weight γ'(t); what
      training does) or "linear" (γ = γ(0) + t (γ(1) − γ(0)), weight
      γ(1) − γ(0): γ uniform between the schedule's endpoints). The network
      sees γ, not t, so both have the same expectation (paper §5); the
      linear path avoids the heavy tail of a schedule with steep ends
      (cosine, linear_beta), whose rare draws near t = 0 or 1 carry huge
      weights γ'(t). Discrete time (``num_steps`` > 0) always uses the schedule.
  """
  schedule: nn.Module
  network: nn.Module
  vocab_size: int = 256
  num_steps: int = 0
  antithetic_time_sampling: bool = True
  decoder: str = "softmax"
  prediction: str = "eps"
  loss_weighting: str = "elbo"
  sigmoid_bias: float = 2.0
  minimize_variance: bool = False
  num_classes: int = 0
  label_dropout: float = 0.0
  gamma_path: str = "schedule"

  def gamma(self, t: jax.Array) -> jax.Array:
    return self.schedule(t)

  def eps_hat(self, z_t: jax.Array, gamma_t: jax.Array, conditioning: Optional[jax.Array] = None,
              train: bool = False, labels: Optional[jax.Array] = None) -> jax.Array:
    """ε̂(z_t; γ_t), given the class ``labels`` ``[B]`` of a conditional model (None: the null class)."""
    extra = {} if labels is None else {"labels": labels}
    output = self.network(z_t, gamma_t, conditioning, train=train, **extra)
    return objectives.eps_from_prediction(output, z_t, gamma_t, self.prediction)

  def __call__(self, x: jax.Array, key: Optional[jax.Array], conditioning: Optional[jax.Array] = None,
               *, labels: Optional[jax.Array] = None, train: bool = False,
               noise: Optional[dict] = None) -> dict[str, jax.Array]:
    """Args: x integers ``[B, …]``; key a PRNG key; conditioning ``[B, K]``;
    labels ``[B]`` (a conditional model: the loss is −log p(x│c); None: the
    null class, −log p(x)); noise: the draws of :func:`draw_noise` (then
    ``key`` is unused).

    Returns: ``loss_recon``, ``loss_prior``, ``loss_diff``, ``loss`` (their
    sum), each ``[B]`` nats; ``gamma_0``, ``gamma_1`` scalars;
    ``variance_probe`` ``[B]`` zeros (see ``minimize_variance``); ``loss_weight``
    ``[B]``, w(λ_t) of ``loss_weighting`` (no gradient).
    """
    if self.decoder not in DECODERS:
      raise ValueError(f"unknown decoder {self.decoder!r}; expected one of {DECODERS}")
    if noise is None:
      noise = draw_noise(key, x.shape, self.antithetic_time_sampling)
    f = losses.encode(x, self.vocab_size)

    gamma_0, gamma_1 = self.schedule(jnp.array([0.0, 1.0]))
    eps_0 = noise["eps_0"]
    loss_recon = RECONSTRUCTION_LOSSES[self.decoder](x, eps_0, gamma_0, self.vocab_size)  # [B]
    loss_prior = losses.prior_loss(x, gamma_1, self.vocab_size)  # [B]

    t = noise["t"]
    if self.num_steps > 0:
      t = (jnp.floor(t * self.num_steps) + 1.0) / self.num_steps  # t ∈ {1/T, …, 1}
    if self.gamma_path not in GAMMA_PATHS:
      raise ValueError(f"unknown gamma_path {self.gamma_path!r}; expected one of {GAMMA_PATHS}")
    if self.gamma_path == "linear" and self.num_steps == 0:  # γ uniform between the endpoints
      gamma_t = gamma_0 + (gamma_1 - gamma_0) * t
      dgamma_dt = jnp.broadcast_to(gamma_1 - gamma_0, t.shape)
      probe = jnp.zeros_like(t)
    elif self.minimize_variance and self.num_steps == 0 and hasattr(self.schedule, "with_slope"):
      gamma_t, dgamma_dt, probe = self.schedule.with_slope(t, minimize_variance=train)
    else:  # γ_t and γ'(t) in one forward-mode pass
      gamma_t, dgamma_dt = nn.jvp(lambda mdl, t: mdl(t), self.schedule, (t,), (jnp.ones_like(t),),
                                  variable_tangents={})
      probe = jnp.zeros_like(t)
    eps = noise["eps"]
    alpha_t, sigma_t = alpha_sigma(losses._per_example(gamma_t, f.ndim))
    z_t = alpha_t * f + sigma_t * eps
    eps_hat = self.eps_hat(z_t, gamma_t, conditioning, train=train, labels=labels)
    if self.num_steps > 0:
      gamma_s = self.schedule(t - 1.0 / self.num_steps)
      loss_diff = losses.diffusion_loss_discrete(eps, eps_hat, gamma_t, gamma_s, self.num_steps)
    else:
      loss_diff = losses.diffusion_loss(eps, eps_hat, dgamma_dt)

    return {
        "loss_recon": loss_recon,
        "loss_prior": loss_prior,
        "loss_diff": loss_diff,
        "loss": loss_recon + loss_prior + loss_diff,
        "gamma_0": gamma_0,
        "gamma_1": gamma_1,
        "variance_probe": probe,
        "loss_weight": objectives.loss_weight(self.loss_weighting, gamma_t, dgamma_dt, gamma_0, gamma_1,
                                              self.sigmoid_bias),
    }

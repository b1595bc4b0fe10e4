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

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.typing import ArrayLike

from vdm import guidance as guidance_lib
from vdm import losses, sharding

STEP_SAMPLERS = ("ancestral", "ddim")  # a fixed grid of N steps
SAMPLERS = STEP_SAMPLERS + ("ode",)  # "ode": the probability-flow ODE, adaptive steps (vdm.ode)


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


def langevin_step(z_t: ArrayLike, eps_hat: ArrayLike, gamma_t: ArrayLike, snr: float,
                  noise: ArrayLike) -> jax.Array:
  """One Langevin corrector step at time t (Song et al. 2021, App. G: the predictor–corrector sampler).

  A step of Langevin dynamics on the marginal q(z_t), which leaves it
  invariant as the step size → 0: z ← z + δ s + √(2δ) ξ with the score
  s = −ε̂/σ_t and δ = 2 (r ‖ξ‖ / ‖s‖)², r = ``snr``. Song et al. average
  the two norms over the batch; here they are each example's, so a sample
  does not depend on the others in its batch.

  Args:
    z_t, eps_hat: ``[B, …]``; ε̂ taken at z_t.
    gamma_t: γ at t (scalar or ``[B]``).
    snr: r > 0, the step's size relative to the noise it adds.
    noise: ξ, standard normal ``[B, …]``.
  Returns:
    z_t ``[B, …]`` after the step.
  """
  z_t = jnp.asarray(z_t)
  _, sigma_sq_t = _alpha_sq_sigma_sq(gamma_t, z_t.ndim)
  score = -eps_hat / jnp.sqrt(sigma_sq_t)
  axes = tuple(range(1, z_t.ndim))
  norm = lambda v: jnp.sqrt(jnp.sum(jnp.square(v), axes, keepdims=True))  # noqa: E731  [B, 1, …]
  delta = 2.0 * jnp.square(snr * norm(noise) / norm(score))
  return z_t + delta * score + jnp.sqrt(2.0 * delta) * noise


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
                eta: float = 1.0, clip_denoised: bool = False, first: ArrayLike = 0,
                last: Optional[ArrayLike] = None, langevin_steps: int = 0,
                langevin_snr: float = 0.1) -> jax.Array:
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
    first, last: run only loop iterations ``first ≤ i < last`` (i = 0 is the
      step from t = 1; default: all N), so a long loop can run in pieces, then
      ``z_1`` is the latent after iteration ``first − 1``. May be traced.
    langevin_steps: corrector steps (:func:`langevin_step`, ``langevin_snr``)
      after each step that lands at s > 0; each costs one more network
      evaluation. 0: the predictor alone.
  Returns:
    z_0 ``[B, …]`` (the latent after iteration ``last − 1``).
  """
  if sampler not in STEP_SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {STEP_SAMPLERS}")
  batch, shape = z_1.shape[0], z_1.shape[1:]

  def body(i, z_t):
    step = num_steps - i  # N, …, 1
    t = jnp.full((batch,), step / num_steps, jnp.float32)
    s = jnp.full((batch,), (step - 1) / num_steps, jnp.float32)
    gamma_t, gamma_s = gamma_fn(t), gamma_fn(s)
    eps_hat = eps_fn(z_t, gamma_t)
    if clip_denoised:
      eps_hat = clip_eps_hat(z_t, eps_hat, gamma_t)
    if sampler == "ddim" and isinstance(eta, (int, float)) and eta == 0.0:
      z_s = ddim_step(z_t, eps_hat, gamma_t, gamma_s)  # deterministic: no noise drawn
    else:
      noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape))(sample_keys)
      if sampler == "ancestral":
        z_s = ancestral_step(z_t, eps_hat, gamma_t, gamma_s, noise)
      else:
        z_s = ddim_step(z_t, eps_hat, gamma_t, gamma_s, eta, noise)
    if not langevin_steps:
      return z_s

    def correct(j, z):
      # Keys of their own: step `step`'s key with j + 1 folded in (the predictor uses step's key itself).
      xi = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(jax.random.fold_in(k, step), j + 1),
                                                shape))(sample_keys)
      return langevin_step(z, eps_fn(z, gamma_s), gamma_s, langevin_snr, xi)

    # Not at s = 0: the decoder takes z_0 as it is.
    return jax.lax.cond(step > 1, lambda z: jax.lax.fori_loop(0, langevin_steps, correct, z), lambda z: z, z_s)

  return jax.lax.fori_loop(first, num_steps if last is None else last, body, z_1)


def encode_loop(eps_fn: Callable[[jax.Array, jax.Array], jax.Array],
                gamma_fn: Callable[[jax.Array], jax.Array], z_0: jax.Array, num_steps: int) -> jax.Array:
  """The deterministic DDIM sampler (η = 0) run forwards, z_0 → z_1, in one ``lax.fori_loop``.

  Step i goes from s = i/N to t = (i+1)/N with ε̂ taken at z_s:
  ``z_t = α_t x̂ + σ_t ε̂``, ``x̂ = (z_s − σ_s ε̂)/α_s`` — :func:`ddim_step` with
  the times swapped. As N grows it inverts :func:`sample_loop` with
  ``sampler="ddim", eta=0`` (both follow the probability-flow ODE).
  """
  batch = z_0.shape[0]

  def body(i, z_s):
    s = jnp.full((batch,), i / num_steps, jnp.float32)
    t = jnp.full((batch,), (i + 1) / num_steps, jnp.float32)
    gamma_s = gamma_fn(s)
    return ddim_step(z_s, eps_fn(z_s, gamma_s), gamma_s, gamma_fn(t))

  return jax.lax.fori_loop(0, num_steps, body, z_0)


def slerp(z_a: ArrayLike, z_b: ArrayLike, fractions: ArrayLike) -> jax.Array:
  """Spherical interpolation between latents ``[…]`` at ``fractions`` ``[K]`` (0 → z_a, 1 → z_b): ``[K, …]``.

  Gaussian latents of many dimensions lie near a sphere; the straight line
  between two of them passes through too-short vectors, the great circle
  does not. Falls back to the straight line for (anti)parallel latents.
  """
  z_a, z_b = jnp.asarray(z_a, jnp.float32), jnp.asarray(z_b, jnp.float32)
  fractions = jnp.asarray(fractions, jnp.float32).reshape((-1,) + (1,) * z_a.ndim)
  cos = jnp.vdot(z_a, z_b) / (jnp.linalg.norm(z_a) * jnp.linalg.norm(z_b))
  theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
  sin = jnp.sin(theta)
  safe = sin > 1e-6
  sin = jnp.where(safe, sin, 1.0)
  w_a = jnp.where(safe, jnp.sin((1.0 - fractions) * theta) / sin, 1.0 - fractions)
  w_b = jnp.where(safe, jnp.sin(fractions * theta) / sin, fractions)
  return w_a * z_a + w_b * z_b


def _eps_fn(model, params, labels, guidance):
  """(z, γ) → ε̂ of ``model``; a conditional model's with ``labels`` and guidance weight ``guidance``."""
  variables = {"params": params}
  if getattr(model, "num_classes", 0):
    conditional = lambda z, g, c: model.apply(variables, z, g, labels=c, method=model.eps_hat)  # noqa: E731
    return lambda z, g: guidance_lib.guided_eps_hat(conditional, z, g, labels, guidance,  # noqa: E731
                                                    model.num_classes)
  return lambda z, g: model.apply(variables, z, g, method=model.eps_hat)  # noqa: E731


def _encode_batch(model, params, images, labels, *, num_steps, guidance):
  """Integer images ``[B, …]`` → z_1: z_0 = α_0 · encode(x) (the mean of q(z_0│x)), then DDIM forwards."""
  gamma_fn = lambda t: model.apply({"params": params}, t, method=model.gamma)  # noqa: E731
  alpha_sq_0, _ = _alpha_sq_sigma_sq(gamma_fn(jnp.zeros((1,)))[0], images.ndim)
  z_0 = jnp.sqrt(alpha_sq_0) * losses.encode(images, model.vocab_size)
  return encode_loop(_eps_fn(model, params, labels, guidance), gamma_fn, z_0, num_steps)


def _decode_batch(model, params, z_1, labels, *, num_steps, guidance):
  """z_1 ``[B, …]`` → integer images: DDIM (η = 0) backwards, then the decoder's argmax."""
  gamma_fn = lambda t: model.apply({"params": params}, t, method=model.gamma)  # noqa: E731
  z_0 = sample_loop(_eps_fn(model, params, labels, guidance), gamma_fn, z_1, None, num_steps, sampler="ddim",
                    eta=0.0)
  return decode(z_0, gamma_fn(jnp.zeros((1,)))[0], model.vocab_size, model.decoder)


@functools.lru_cache(maxsize=16)
def _latent_program(kind, model, num_steps, guidance, mesh):
  fn = functools.partial(_encode_batch if kind == "encode" else _decode_batch, model, num_steps=num_steps,
                         guidance=guidance)
  if mesh is None:
    return jax.jit(fn)
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(sharding.on_mesh(fn, mesh), in_shardings=(rep, data, data), out_shardings=data)


def _by_batches(kind, model, params, inputs, num_steps, batch_size, mesh, labels, guidance):
  inputs = np.asarray(inputs)
  n = len(inputs)
  batch_size, _, data, to_device, fetch = _transfers(mesh, min(batch_size or n, n))
  labels = _sample_labels(model, labels, n, batch_size)
  program = _latent_program(kind, model, num_steps, float(guidance), mesh)
  outputs = []
  for start in range(0, n, batch_size):
    idx = np.minimum(np.arange(start, start + batch_size), n - 1)  # the last batch is padded, then cut
    outputs.append(fetch(program(params, to_device(inputs[idx], data), to_device(labels[idx], data))))
  return np.concatenate(outputs)[:n]


def _transfers(mesh, batch_size: int):
  """(batch size, replicated and batch shardings, to_device(x, sharding), fetch(x)) for ``mesh`` (or none).

  On a mesh the batch is rounded up to a multiple of the device count (padded, then cut).
  """
  if mesh is None:
    return batch_size, None, None, (lambda x, _: x), (lambda x: np.asarray(jax.device_get(x)))
  return (sharding.round_up(batch_size), sharding.replicated(mesh), sharding.batch_sharding(mesh),
          sharding.from_host, sharding.to_host)


def _sample_labels(model, labels, count: int, pad: int) -> np.ndarray:
  """Each sample's class, int32 ``[count + pad]``: the null class where none is given and on the padding."""
  null_class = getattr(model, "num_classes", 0)
  given = np.full((count,), null_class, np.int32) if labels is None else np.asarray(labels, np.int32)
  return np.concatenate([given, np.full((pad,), null_class, np.int32)])


def encode(model, params, images: ArrayLike, *, num_steps: int = 1000, batch_size: Optional[int] = None,
           mesh=None, labels: Optional[ArrayLike] = None, guidance: float = 0.0) -> np.ndarray:
  """Integer images ``[N, H, W, C]`` → their latents z_1 (float32), by the deterministic DDIM sampler run forwards.

  :func:`decode_latents` with the same ``num_steps`` maps them back; the
  round trip is exact as N → ∞ (README: the pixel error at N = 100 and 1,000).
  """
  return _by_batches("encode", model, params, images, num_steps, batch_size, mesh, labels, guidance)


def decode_latents(model, params, z_1: ArrayLike, *, num_steps: int = 1000, batch_size: Optional[int] = None,
                   mesh=None, labels: Optional[ArrayLike] = None, guidance: float = 0.0) -> np.ndarray:
  """Latents z_1 ``[N, H, W, C]`` → int32 images, by the deterministic DDIM sampler (η = 0)."""
  return _by_batches("decode", model, params, z_1, num_steps, batch_size, mesh, labels, guidance)


def _first_latents(key_data, indices, image_shape):
  """z_1 ``[B, …]`` and each sample's step-key data ``[B, 2]``, from (key, sample index) alone."""
  key = jax.random.wrap_key_data(key_data)
  sample_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
  keys = jax.vmap(jax.random.split)(sample_keys)  # [B, 2]
  z_1 = jax.vmap(lambda k: jax.random.normal(k, image_shape))(keys[:, 0])
  return z_1, jax.random.key_data(keys[:, 1])


def _denoise(model, params, z_t, step_key_data, labels, first, *, num_steps, steps_per_call, sampler, eta,
             clip_denoised, guidance, langevin_steps=0, langevin_snr=0.1):
  """Loop iterations ``first … first + steps_per_call − 1`` (at most up to N) of the sampler.

  ``labels`` ``[B]``: the classes of a conditional model (guided with weight
  ``guidance``); an unconditional model ignores them.
  """
  eps_fn = _eps_fn(model, params, labels, guidance)
  gamma_fn = lambda t: model.apply({"params": params}, t, method=model.gamma)  # noqa: E731
  return sample_loop(eps_fn, gamma_fn, z_t, jax.random.wrap_key_data(step_key_data), num_steps,
                     sampler=sampler, eta=eta, clip_denoised=clip_denoised, first=first,
                     last=jnp.minimum(first + steps_per_call, num_steps), langevin_steps=langevin_steps,
                     langevin_snr=langevin_snr)


def _decode(model, params, z_0, step_key_data, decode_draw):
  gamma_0 = model.apply({"params": params}, jnp.zeros((1,)), method=model.gamma)[0]
  if decode_draw:  # step 0 is never used inside the loop: its key is free
    draw = lambda z, k: decode(z[None], gamma_0, model.vocab_size, model.decoder,  # noqa: E731
                               key=jax.random.fold_in(k, 0))[0]
    return jax.vmap(draw)(z_0, jax.random.wrap_key_data(step_key_data))
  return decode(z_0, gamma_0, model.vocab_size, model.decoder)


def _sample_batch(model, params, key, indices, image_shape, num_steps, sampler, eta, clip_denoised,
                  decode_draw, labels=None, guidance=0.0, langevin_steps=0, langevin_snr=0.1):
  """One batch, the whole loop in one program: (images, z_0). ``key`` is a typed key."""
  z_1, step_key_data = _first_latents(jax.random.key_data(key), indices, image_shape)
  if labels is None:
    labels = jnp.full(indices.shape, getattr(model, "num_classes", 0), jnp.int32)
  z_0 = _denoise(model, params, z_1, step_key_data, labels, 0, num_steps=num_steps, steps_per_call=num_steps,
                 sampler=sampler, eta=eta, clip_denoised=clip_denoised, guidance=guidance,
                 langevin_steps=langevin_steps, langevin_snr=langevin_snr)
  return _decode(model, params, z_0, step_key_data, decode_draw), z_0


@functools.lru_cache(maxsize=16)
def _programs(model, image_shape, num_steps, steps_per_call, sampler, eta, clip_denoised, decode_draw, mesh,
              guidance=0.0, langevin_steps=0, langevin_snr=0.1):
  """The three jitted pieces of :func:`generate`, made once per setting (a new jit would compile again)."""
  start = functools.partial(_first_latents, image_shape=image_shape)
  denoise = functools.partial(_denoise, model, num_steps=num_steps, steps_per_call=steps_per_call,
                              sampler=sampler, eta=eta, clip_denoised=clip_denoised, guidance=guidance,
                              langevin_steps=langevin_steps, langevin_snr=langevin_snr)
  finish = functools.partial(_decode, model, decode_draw=decode_draw)
  if mesh is None:
    return jax.jit(start), jax.jit(denoise), jax.jit(finish)
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return (jax.jit(start, in_shardings=(rep, data), out_shardings=(data, data)),
          jax.jit(sharding.on_mesh(denoise, mesh), in_shardings=(rep, data, data, data, rep),
                  out_shardings=data),
          jax.jit(finish, in_shardings=(rep, data, data), out_shardings=data))


def _ode_batch(model, params, key_data, indices, labels, *, image_shape, rtol, atol, max_steps, guidance):
  """One batch by the probability-flow ODE: (images, z_0, solver steps, failed); z_1 as the other samplers draw it."""
  from vdm import ode  # diffrax: an extra
  z_1, _ = _first_latents(key_data, indices, image_shape)
  gamma_fn = lambda t: model.apply({"params": params}, t, method=model.gamma)  # noqa: E731
  z_0, steps, failed = ode.sample(_eps_fn(model, params, labels, guidance), gamma_fn, z_1, rtol=rtol, atol=atol,
                                  max_steps=max_steps)
  return decode(z_0, gamma_fn(jnp.zeros((1,)))[0], model.vocab_size, model.decoder), z_0, steps, failed


@functools.lru_cache(maxsize=16)
def _ode_program(model, image_shape, rtol, atol, max_steps, guidance, mesh):
  fn = functools.partial(_ode_batch, model, image_shape=image_shape, rtol=rtol, atol=atol, max_steps=max_steps,
                         guidance=guidance)
  if mesh is None:
    return jax.jit(fn)
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(sharding.on_mesh(fn, mesh), in_shardings=(rep, rep, data, data),
                 out_shardings=(data, data, rep, rep))


def _advance(bar: tqdm.tqdm, latents: jax.Array, steps: int) -> None:
  jax.block_until_ready(latents)
  bar.update(steps)


def generate(model, params, key: jax.Array, num_samples: int, image_shape: tuple, *,
             num_steps: int = 1000, sampler: str = "ancestral", eta: float = 1.0,
             clip_denoised: bool = False, decode_draw: bool = False,
             batch_size: Optional[int] = None, progress: bool = False, mesh=None,
             steps_per_call: Optional[int] = None, labels: Optional[ArrayLike] = None,
             guidance: float = 0.0, rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096,
             stats: Optional[dict] = None, langevin_steps: int = 0, langevin_snr: float = 0.1):
  """Draws ``num_samples`` images from a VDM, ``batch_size`` at a time.

  Sample k depends only on (key, k): its key is ``fold_in(key, k)``, so the
  images do not change with the batch size, the number of devices, or how
  the loop is cut into calls.

  Args:
    model: a :class:`vdm.model.VDM`; params: its parameters (the EMA ones).
    image_shape: ``(H, W, C)``.
    num_steps, sampler, eta, clip_denoised: see :func:`sample_loop`.
    decode_draw: draw the image from the decoder at t = 0 instead of its argmax.
    batch_size: images per compiled batch (default: all at once).
    progress: a progress bar over sampler steps (then the loop runs in about
      50 calls of ``steps_per_call`` steps, compiled once).
    mesh: shard each batch over this mesh's ``data`` axis (every process
      must call; each gets all the images).
    steps_per_call: loop iterations per compiled call (default: all N, or
      N/50 with ``progress``).
    labels: ``[num_samples]`` classes for a conditional model (default: the
      null class, i.e. unconditional samples); ignored by others.
    guidance: classifier-free guidance weight w (:mod:`vdm.guidance`).
    rtol, atol, max_steps: the ODE solver's tolerances and step limit
      (``sampler="ode"``, which ignores ``num_steps``, ``eta`` and
      ``clip_denoised``; :mod:`vdm.ode`).
    stats: a dict to receive ``solver_steps`` (one entry per batch) with
      ``sampler="ode"``.
    langevin_steps, langevin_snr: corrector steps after each sampler step
      (:func:`sample_loop`); refused with ``sampler="ode"``.
  Returns:
    ``(images, z_0)``: int32 ``[N, H, W, C]`` and float32 latents, on the host.
  """
  batch_size = min(batch_size or num_samples, num_samples)
  if sampler == "ode" and langevin_steps:
    raise ValueError("langevin_steps: the ODE sampler takes no corrector steps; use 'ancestral' or 'ddim'")
  if sampler == "ode":
    return _generate_ode(model, params, key, num_samples, tuple(image_shape), batch_size, mesh, labels, guidance,
                         rtol, atol, max_steps, progress, stats)
  if steps_per_call is None:
    steps_per_call = -(-num_steps // 50) if progress else num_steps
  steps_per_call = max(1, min(steps_per_call, num_steps))
  start, denoise, finish = _programs(model, tuple(image_shape), num_steps, steps_per_call, sampler, float(eta),
                                     clip_denoised, decode_draw, mesh, float(guidance), int(langevin_steps),
                                     float(langevin_snr))
  key_data = np.asarray(jax.random.key_data(key))
  batch_size, rep, data, to_device, fetch = _transfers(mesh, batch_size)
  all_labels = _sample_labels(model, labels, num_samples, batch_size)
  num_batches = -(-num_samples // batch_size)
  bar = tqdm.tqdm(total=num_batches * num_steps, desc="sample", unit="step", disable=not progress,
                  leave=False, dynamic_ncols=True)
  images, latents = [], []
  for first_index in range(0, num_samples, batch_size):
    indices = np.arange(first_index, first_index + batch_size, dtype=np.int32)  # the last batch is padded, then cut
    z, step_keys = start(to_device(key_data, rep), to_device(indices, data))
    batch_labels = to_device(all_labels[first_index:first_index + batch_size], data)
    previous = None  # (latents, steps) of the call before: the bar waits one call behind, so the
    for first in range(0, num_steps, steps_per_call):  # device always has the next call queued
      z = denoise(params, z, step_keys, batch_labels, to_device(np.int32(first), rep))
      if previous is not None:
        _advance(bar, *previous)
      previous = (z, min(steps_per_call, num_steps - first))
    _advance(bar, *previous)
    images.append(fetch(finish(params, z, step_keys)))
    latents.append(fetch(z))
  bar.close()
  return np.concatenate(images)[:num_samples], np.concatenate(latents)[:num_samples]


def _generate_ode(model, params, key, num_samples, image_shape, batch_size, mesh, labels, guidance, rtol, atol,
                  max_steps, progress, stats):
  """:func:`generate` with ``sampler="ode"``: one compiled solve per batch; the bar counts images."""
  from vdm import ode
  program = _ode_program(model, image_shape, float(rtol), float(atol), int(max_steps), float(guidance), mesh)
  key_data = np.asarray(jax.random.key_data(key))
  batch_size, rep, data, to_device, fetch = _transfers(mesh, batch_size)
  all_labels = _sample_labels(model, labels, num_samples, batch_size)
  bar = tqdm.tqdm(total=num_samples, desc="sample (ode)", unit="image", disable=not progress, leave=False,
                  dynamic_ncols=True)
  images, latents, steps = [], [], []
  for first_index in range(0, num_samples, batch_size):
    indices = np.arange(first_index, first_index + batch_size, dtype=np.int32)
    out, z_0, solver_steps, failed = program(params, to_device(key_data, rep), to_device(indices, data),
                                             to_device(all_labels[indices], data))
    if bool(fetch(failed)):
      raise ode.SolverError(f"the ODE solver stopped before t = 0 (max_steps={max_steps} steps at rtol={rtol}, "
                         f"atol={atol}); loosen the tolerances or raise max_steps")
    images.append(fetch(out))
    latents.append(fetch(z_0))
    steps.append(int(fetch(solver_steps)))
    bar.update(min(batch_size, num_samples - first_index))
  bar.close()
  if stats is not None:
    stats["solver_steps"] = steps
  return np.concatenate(images)[:num_samples], np.concatenate(latents)[:num_samples]

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

from vdm import losses, sharding

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
                eta: float = 1.0, clip_denoised: bool = False, first: ArrayLike = 0,
                last: Optional[ArrayLike] = None) -> jax.Array:
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
  Returns:
    z_0 ``[B, …]`` (the latent after iteration ``last − 1``).
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

  return jax.lax.fori_loop(first, num_steps if last is None else last, body, z_1)


def _first_latents(key_data, indices, image_shape):
  """z_1 ``[B, …]`` and each sample's step-key data ``[B, 2]``, from (key, sample index) alone."""
  key = jax.random.wrap_key_data(key_data)
  sample_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
  keys = jax.vmap(jax.random.split)(sample_keys)  # [B, 2]
  z_1 = jax.vmap(lambda k: jax.random.normal(k, image_shape))(keys[:, 0])
  return z_1, jax.random.key_data(keys[:, 1])


def _denoise(model, params, z_t, step_key_data, first, *, num_steps, steps_per_call, sampler, eta,
             clip_denoised):
  """Loop iterations ``first … first + steps_per_call − 1`` (at most up to N) of the sampler."""
  variables = {"params": params}
  eps_fn = lambda z, g: model.apply(variables, z, g, method=model.eps_hat)  # noqa: E731
  gamma_fn = lambda t: model.apply(variables, t, method=model.gamma)  # noqa: E731
  return sample_loop(eps_fn, gamma_fn, z_t, jax.random.wrap_key_data(step_key_data), num_steps,
                     sampler=sampler, eta=eta, clip_denoised=clip_denoised, first=first,
                     last=jnp.minimum(first + steps_per_call, num_steps))


def _decode(model, params, z_0, step_key_data, decode_draw):
  gamma_0 = model.apply({"params": params}, jnp.zeros((1,)), method=model.gamma)[0]
  if decode_draw:  # step 0 is never used inside the loop: its key is free
    draw = lambda z, k: decode(z[None], gamma_0, model.vocab_size, model.decoder,  # noqa: E731
                               key=jax.random.fold_in(k, 0))[0]
    return jax.vmap(draw)(z_0, jax.random.wrap_key_data(step_key_data))
  return decode(z_0, gamma_0, model.vocab_size, model.decoder)


def _sample_batch(model, params, key, indices, image_shape, num_steps, sampler, eta, clip_denoised,
                  decode_draw):
  """One batch, the whole loop in one program: (images, z_0). ``key`` is a typed key."""
  z_1, step_key_data = _first_latents(jax.random.key_data(key), indices, image_shape)
  z_0 = _denoise(model, params, z_1, step_key_data, 0, num_steps=num_steps, steps_per_call=num_steps,
                 sampler=sampler, eta=eta, clip_denoised=clip_denoised)
  return _decode(model, params, z_0, step_key_data, decode_draw), z_0


@functools.lru_cache(maxsize=16)
def _programs(model, image_shape, num_steps, steps_per_call, sampler, eta, clip_denoised, decode_draw, mesh):
  """The three jitted pieces of :func:`generate`, made once per setting (a new jit would compile again)."""
  start = functools.partial(_first_latents, image_shape=image_shape)
  denoise = functools.partial(_denoise, model, num_steps=num_steps, steps_per_call=steps_per_call,
                              sampler=sampler, eta=eta, clip_denoised=clip_denoised)
  finish = functools.partial(_decode, model, decode_draw=decode_draw)
  if mesh is None:
    return jax.jit(start), jax.jit(denoise), jax.jit(finish)
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return (jax.jit(start, in_shardings=(rep, data), out_shardings=(data, data)),
          jax.jit(denoise, in_shardings=(rep, data, data, rep), out_shardings=data),
          jax.jit(finish, in_shardings=(rep, data, data), out_shardings=data))


def _advance(bar: tqdm.tqdm, latents: jax.Array, steps: int) -> None:
  jax.block_until_ready(latents)
  bar.update(steps)


def generate(model, params, key: jax.Array, num_samples: int, image_shape: tuple, *,
             num_steps: int = 1000, sampler: str = "ancestral", eta: float = 1.0,
             clip_denoised: bool = False, decode_draw: bool = False,
             batch_size: Optional[int] = None, progress: bool = False, mesh=None,
             steps_per_call: Optional[int] = None):
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
  Returns:
    ``(images, z_0)``: int32 ``[N, H, W, C]`` and float32 latents, on the host.
  """
  batch_size = min(batch_size or num_samples, num_samples)
  if steps_per_call is None:
    steps_per_call = -(-num_steps // 50) if progress else num_steps
  steps_per_call = max(1, min(steps_per_call, num_steps))
  start, denoise, finish = _programs(model, tuple(image_shape), num_steps, steps_per_call, sampler, float(eta),
                                     clip_denoised, decode_draw, mesh)
  key_data = np.asarray(jax.random.key_data(key))
  if mesh is None:
    rep = data = None
    to_device, fetch = (lambda x, _: x), (lambda x: np.asarray(jax.device_get(x)))
  else:
    batch_size = sharding.round_up(batch_size)
    rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    to_device, fetch = sharding.from_host, sharding.to_host
  num_batches = -(-num_samples // batch_size)
  bar = tqdm.tqdm(total=num_batches * num_steps, desc="sample", unit="step", disable=not progress,
                  leave=False, dynamic_ncols=True)
  images, latents = [], []
  for first_index in range(0, num_samples, batch_size):
    indices = np.arange(first_index, first_index + batch_size, dtype=np.int32)  # the last batch is padded, then cut
    z, step_keys = start(to_device(key_data, rep), to_device(indices, data))
    previous = None  # (latents, steps) of the call before: the bar waits one call behind, so the
    for first in range(0, num_steps, steps_per_call):  # device always has the next call queued
      z = denoise(params, z, step_keys, to_device(np.int32(first), rep))
      if previous is not None:
        _advance(bar, *previous)
      previous = (z, min(steps_per_call, num_steps - first))
    _advance(bar, *previous)
    images.append(fetch(finish(params, z, step_keys)))
    latents.append(fetch(z))
  bar.close()
  return np.concatenate(images)[:num_samples], np.concatenate(latents)[:num_samples]

"""Class conditioning and classifier-free guidance (Ho & Salimans 2021).

A conditional VDM with K classes takes labels in {0, …, K}; label K is the
null class ∅, "no label". Training replaces a share of the labels by ∅
(:func:`drop_labels`), so one network learns both ε̂(z, c) and ε̂(z, ∅).
Guided sampling with weight w uses

    ε̃ = (1 + w) ε̂(z, c) − w ε̂(z, ∅),

w = 0 being the conditional model itself and w = −1 the unconditional one.
"""

from typing import Callable

import jax
import jax.numpy as jnp


def drop_labels(key: jax.Array, labels: jax.Array, rate: float, null_class: int) -> jax.Array:
  """``labels`` ``[B]`` with each one replaced by ``null_class`` with probability ``rate``."""
  if rate <= 0.0:
    return labels
  drop = jax.random.uniform(key, labels.shape) < rate
  return jnp.where(drop, null_class, labels).astype(labels.dtype)


def guided_eps_hat(eps_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], z_t: jax.Array,
                   gamma_t: jax.Array, labels: jax.Array, guidance: float, null_class: int) -> jax.Array:
  """ε̃ = (1 + w) ε̂(z_t, c) − w ε̂(z_t, ∅), both in one network call of twice the batch.

  Args:
    eps_fn: (z ``[B, …]``, γ ``[B]``, labels ``[B]``) → ε̂ ``[B, …]``.
    z_t: ``[B, …]``; gamma_t: ``[B]``; labels: ``[B]`` integers.
    guidance: w; 0 returns ε̂(z_t, c) with a single pass.
    null_class: the label meaning "no label" (the number of classes).
  """
  if guidance == 0.0:
    return eps_fn(z_t, gamma_t, labels)
  batch = z_t.shape[0]
  both = eps_fn(jnp.concatenate([z_t, z_t]), jnp.concatenate([gamma_t, gamma_t]),
                jnp.concatenate([labels, jnp.full_like(labels, null_class)]))
  conditional, unconditional = both[:batch], both[batch:]
  return (1.0 + guidance) * conditional - guidance * unconditional

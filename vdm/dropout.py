"""Dropout masks at a GPU's speed: one Threefry call for every four activations.

``jax.random.bernoulli`` draws 32 random bits per activation, and JAX's
keys compute a whole generator call for each 32 bits they return (a
Threefry-2x32 call gives 64 bits, a Philox4x32 call 128; JAX XORs them
down to 32). A dropout mask of the paper's CIFAR-10 network (128 × 32 × 32
× 128 activations) so costs 16.8 M calls of compute-bound integer work.
On an H200 the kernels that draw and apply the masks took 12 ms of a 96 ms
step with Philox keys, as remat draws each mask three times (forward,
recomputed forward, backward); kept from the forward pass, the masks still
cost 5.9 ms to draw (README, Performance).

:func:`keep_mask` uses every bit: each Threefry-2x32-20 call's two 32-bit
words are split into four 16-bit uniforms, one per activation, so a mask
costs 1/4 of the calls. The keep probability is rounded to a multiple of
2⁻¹⁶ (0.9 becomes 58982/65536 = 0.9000092) and :class:`Dropout` divides
the kept activations by that rounded value, so E[output] = input exactly.
It is ``execution.dropout_rng="packed"``: the step's dropout key is
rewrapped as a :data:`PACKED` key, which splits and folds in as Threefry
does and tells :class:`Dropout` to draw its mask so. Only standard integer
operations are involved: the same bits on every backend and sharding
(a Philox call needs a 32 × 32 → 64-bit product, ``lax.mulhi``, which
JAX 0.10.2 cannot partition: with the batch sharded over devices the
``"philox"`` key fails to compile).

Threefry-2x32-20: Salmon et al. 2011, "Parallel random numbers: as easy
as 1, 2, 3" (the Random123 library; its known-answer vectors are in the
tests), through ``jax.extend.random.threefry2x32_p``.
"""

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
from jax import lax

BITS = 16  # per activation: four activations per 64-bit call

_THREEFRY = jex_random.threefry_prng_impl
PACKED = jex_random.define_prng_impl(key_shape=_THREEFRY.key_shape, seed=_THREEFRY.seed, split=_THREEFRY.split,
                                     random_bits=_THREEFRY.random_bits, fold_in=_THREEFRY.fold_in,
                                     name="threefry2x32_packed", tag="fryp")
"""Threefry-2x32 keys (split and fold in as Threefry does) whose dropout masks :func:`keep_mask` draws."""


def packed_key(key: jax.Array) -> jax.Array:
  """``key`` (a typed key of two uint32 words, e.g. Threefry's) as a :data:`PACKED` key of the same data."""
  return jax.random.wrap_key_data(jax.random.key_data(key), impl=PACKED)


def keep_threshold(keep_prob: float) -> int:
  """The keep probability in units of 2⁻¹⁶: an activation is kept when its 16-bit uniform is below this."""
  if not 0.0 < keep_prob <= 1.0:
    raise ValueError(f"keep_prob: expected a probability in (0, 1], got {keep_prob}")
  return max(1, min(1 << BITS, round(keep_prob * (1 << BITS))))


def keep_mask(key: jax.Array, keep_prob: float, shape: tuple) -> jax.Array:
  """Boolean mask of ``shape``: True with probability ``keep_threshold(keep_prob) / 65536``.

  ``key``: a typed key of two uint32 words (k0, k1). Activation ``i``
  (row-major in ``shape``) takes bits ``16 (i mod 2)`` to ``16 (i mod 2) +
  15`` of word ``⌊i / 2⌋ mod 2`` of the Threefry-2x32-20 call with counter
  (⌊i / 4⌋, 0).
  """
  k0, k1 = jax.random.key_data(key).astype(jnp.uint32)
  size = math.prod(shape)
  calls = -(-size // 4)
  if calls >= 1 << 32:
    raise ValueError(f"keep_mask: {size} activations need more than 2³² counters")
  counters = lax.iota(jnp.uint32, calls)
  words = jex_random.threefry2x32_p.bind(k0, k1, counters, jnp.zeros_like(counters))
  # Materialised, so each call runs once: fused into the mask's consumer, XLA would run it again for
  # each of its four activations. The rest is elementwise and fuses there.
  w0, w1 = lax.optimization_barrier(words)
  # Activation 4c + 2w + h: bits 16h … 16h + 15 of word w. Stacked rather than picked with iotas over
  # [calls, 2, 2], which XLA hoists out of a scanned block's loop as 84 MB of constants read at every draw.
  halves = jnp.stack([w0 & 0xFFFF, w0 >> 16, w1 & 0xFFFF, w1 >> 16], axis=-1)
  halves = halves.reshape(-1) if size == 4 * calls else halves.reshape(-1)[:size]
  return (halves < keep_threshold(keep_prob)).reshape(shape)


def draw_keep(key: jax.Array, keep_prob: float, shape: tuple) -> tuple[jax.Array, float]:
  """A dropout layer's mask and the keep probability it was drawn with.

  A :data:`PACKED` key: :func:`keep_mask`, at the rounded probability. Any
  other key: ``jax.random.bernoulli``, as ``flax.linen.Dropout`` draws it.
  """
  if jax.random.key_impl(key) == PACKED:
    keep_prob = keep_threshold(keep_prob) / (1 << BITS)
    return keep_mask(key, keep_prob, shape), keep_prob
  return jax.random.bernoulli(key, p=keep_prob, shape=shape), keep_prob


class Dropout(nn.Module):
  """``flax.linen.Dropout`` with the mask of :func:`draw_keep`.

  Named as flax's module would be, it gets the same key: with a threefry,
  philox or rbg key (``execution.dropout_rng``) and float32 activations it
  computes what flax's does, bit for bit; with a :data:`PACKED` key,
  :func:`keep_mask`'s mask, the kept activations divided by its rounded
  keep probability. The division is in float32 whatever the activations'
  dtype: flax divides bf16 activations by the keep probability rounded to
  bf16 (0.9 becomes 0.8984375), which scales every kept activation up by
  0.18 % on average (tested).
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    drawn = self.mask(x.shape, deterministic)
    if drawn is None:
      return x
    keep, keep_prob = drawn
    return lax.select(keep, (x.astype(jnp.promote_types(x.dtype, jnp.float32)) / keep_prob).astype(x.dtype),
                      jnp.zeros_like(x))

  def mask(self, shape: tuple, deterministic: bool) -> Optional[tuple[jax.Array, float]]:
    """The mask ``__call__`` would apply to activations of ``shape`` and its keep probability; None where it
    applies none (deterministic, or rate 0). For a kernel that applies it itself (:mod:`vdm.group_norm`)."""
    if deterministic or self.rate == 0.0:
      return None
    if self.rate == 1.0:
      return jnp.zeros(shape, bool), 1.0
    return draw_keep(self.make_rng("dropout"), 1.0 - self.rate, shape)

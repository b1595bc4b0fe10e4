"""Dropout masks at a GPU's speed: one Philox call for every eight activations.

``jax.random.bernoulli`` draws 32 random bits per activation, and JAX's
Philox4x32 key computes all 128 bits of a Philox4x32-10 call for each 32
it returns (it XORs the four words). A dropout mask of the paper's
CIFAR-10 network (128 × 32 × 32 × 128 activations) so costs 16.8 M Philox
calls of compute-bound integer work. On an H200 the kernels that draw and
apply the masks took 12 ms of a 96 ms step, as remat draws each mask three
times (forward, recomputed forward, backward); kept from the forward pass,
the masks still cost 5.9 ms to draw (README, Performance).

:func:`keep_mask` uses every bit: each call's four 32-bit words are split
into eight 16-bit uniforms, one per activation, so a mask costs 1/8 of the
calls. The keep probability is rounded to a multiple of 2⁻¹⁶ (0.9 becomes
58982/65536 = 0.9000092) and :class:`Dropout` divides the kept activations
by that rounded value, so E[output] = input exactly. Like every
``jax.random`` generator the mask is a function of the key and each
activation's index in the array: the same bits on every backend and
sharding.

Philox4x32-10: Salmon et al. 2011, "Parallel random numbers: as easy as
1, 2, 3" (the Random123 library; its known-answer vectors are in the tests).
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_M0, _M1 = np.uint32(0xD2511F53), np.uint32(0xCD9E8D57)  # Philox4x32's multipliers
_W0, _W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)  # its key schedule (Weyl sequence)
ROUNDS = 10
BITS = 16  # per activation: eight activations per 128-bit call


def _mul_hi_lo(a: jax.Array, m: np.uint32) -> tuple[jax.Array, jax.Array]:
  """High and low 32-bit words of the 64-bit product of uint32 ``a`` and the constant ``m``."""
  lo = a * m  # uint32 arithmetic wraps: the low word
  if hasattr(lax, "mulhi"):  # one instruction on GPUs (JAX ≥ 0.10)
    return lax.mulhi(a, jnp.full_like(a, m)), lo
  return _mul_hi_by_halves(a, m), lo


def _mul_hi_by_halves(a: jax.Array, m: np.uint32) -> jax.Array:
  """The high word of a · m from 16-bit halves, in uint32 arithmetic (no uint64 without jax_enable_x64)."""
  a_hi, a_lo = a >> 16, a & 0xFFFF
  m_hi, m_lo = np.uint32(int(m) >> 16), np.uint32(int(m) & 0xFFFF)
  cross_1, cross_2 = a_hi * m_lo, a_lo * m_hi  # each < 2³²
  middle = ((a_lo * m_lo) >> 16) + (cross_1 & 0xFFFF) + (cross_2 & 0xFFFF)  # < 3 · 2¹⁶: no overflow
  return a_hi * m_hi + (cross_1 >> 16) + (cross_2 >> 16) + (middle >> 16)


def philox4x32(key: tuple, counter: tuple) -> tuple:
  """Philox4x32-10 of uint32 arrays: ``key`` (k0, k1), ``counter`` (x0, x1, x2, x3) → four uint32 words.

  Each counter gives 128 independent-looking bits; arrays broadcast
  elementwise (one call per element).
  """
  k0, k1 = (jnp.asarray(k, jnp.uint32) for k in key)
  x0, x1, x2, x3 = (jnp.asarray(x, jnp.uint32) for x in counter)
  for r in range(ROUNDS):
    if r:
      k0, k1 = k0 + _W0, k1 + _W1
    hi0, lo0 = _mul_hi_lo(x0, _M0)
    hi1, lo1 = _mul_hi_lo(x2, _M1)
    x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
  return x0, x1, x2, x3


def keep_threshold(keep_prob: float) -> int:
  """The keep probability in units of 2⁻¹⁶: an activation is kept when its 16-bit uniform is below this."""
  if not 0.0 < keep_prob <= 1.0:
    raise ValueError(f"keep_prob: expected a probability in (0, 1], got {keep_prob}")
  return max(1, min(1 << BITS, round(keep_prob * (1 << BITS))))


def keep_mask(key: jax.Array, keep_prob: float, shape: tuple) -> jax.Array:
  """Boolean mask of ``shape``: True with probability ``keep_threshold(keep_prob) / 65536``.

  ``key``: a typed key of any implementation; its data (folded to two
  words) keys Philox4x32-10. Activation ``i`` (row-major in ``shape``) takes
  bits ``16 (i mod 8)`` to ``16 (i mod 8) + 15`` of call ``⌊i / 8⌋``.
  """
  words = jax.random.key_data(key).reshape(-1, 2).astype(jnp.uint32)
  k0, k1 = functools.reduce(jnp.bitwise_xor, list(words))  # an rbg key has four words: folded to two
  size = math.prod(shape)
  calls = -(-size // 8)
  if calls >= 1 << 32:
    raise ValueError(f"keep_mask: {size} activations need more than 2³² Philox counters")
  words = philox4x32((k0, k1), (lax.iota(jnp.uint32, calls), 0, 0, 0))
  # Materialised (four [calls] arrays), so each call runs once: fused into the mask's consumer, XLA
  # would run it again for each of its eight activations. The rest is elementwise and fuses there.
  words = lax.optimization_barrier(words)
  which = lax.broadcasted_iota(jnp.uint32, (calls, 4, 2), 1)  # the word of activation 8c + 2w + h
  word = jnp.where(which == 0, words[0][:, None, None], jnp.where(which == 1, words[1][:, None, None], jnp.where(
      which == 2, words[2][:, None, None], words[3][:, None, None])))
  halves = (word >> (lax.broadcasted_iota(jnp.uint32, (calls, 4, 2), 2) * 16)) & 0xFFFF  # its 16 bits
  halves = halves.reshape(-1) if size == 8 * calls else halves.reshape(-1)[:size]
  return (halves < keep_threshold(keep_prob)).reshape(shape)


def draw_keep(key: jax.Array, keep_prob: float, shape: tuple) -> tuple[jax.Array, float]:
  """A dropout layer's mask and the keep probability it was drawn with.

  A ``philox4x32`` key: :func:`keep_mask`, at the rounded probability. Any
  other key: ``jax.random.bernoulli``, as ``flax.linen.Dropout`` draws it.
  """
  if _impl_name(key) == "philox4x32":
    keep_prob = keep_threshold(keep_prob) / (1 << BITS)
    return keep_mask(key, keep_prob, shape), keep_prob
  return jax.random.bernoulli(key, p=keep_prob, shape=shape), keep_prob


def _impl_name(key: jax.Array) -> str:
  impl = jax.random.key_impl(key)
  return getattr(impl, "name", str(impl))


class Dropout(nn.Module):
  """``flax.linen.Dropout`` with the mask of :func:`draw_keep`.

  Named as flax's module would be, it gets the same key: with a threefry or
  rbg key (``execution.dropout_rng``) it computes what flax's does, bit for
  bit; with a ``philox4x32`` key, :func:`keep_mask`'s mask, the kept
  activations divided by its rounded keep probability.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep, keep_prob = draw_keep(self.make_rng("dropout"), 1.0 - self.rate, x.shape)
    return lax.select(keep, x / keep_prob, jnp.zeros_like(x))

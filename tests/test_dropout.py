"""vdm.dropout: Philox4x32-10 against Random123's known answers; the masks' bits, rate and independence."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import dropout


def _hex(words):
  return [f"{int(w):08x}" for w in words]


def test_philox_gives_random123s_known_answers():
  # Random123's kat_vectors for philox4x32 with 10 rounds: (counter, key) -> output.
  for counter, key, want in [
      ([0, 0, 0, 0], [0, 0], "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
      ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, "408f276d 41c83b0e a20bc7c6 6d5451fd"),
      ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
       "d16cfe09 94fdcceb 5001e420 24126ea1")]:
    out = dropout.philox4x32([np.uint32(k) for k in key], [np.uint32(c) for c in counter])
    assert _hex(out) == want.split()


def test_the_high_word_by_halves_is_the_high_word_of_the_product():
  # The path for JAX versions without lax.mulhi, against exact integer products.
  rng = np.random.default_rng(0)
  a = np.concatenate([[0, 1, 0xFFFF, 0x10000, 0xFFFFFFFF], rng.integers(0, 2**32, 20_000)]).astype(np.uint32)
  for m in (dropout._M0, dropout._M1, np.uint32(0xFFFFFFFF), np.uint32(1)):
    want = np.array([(int(x) * int(m)) >> 32 for x in a], np.uint32)
    np.testing.assert_array_equal(np.asarray(dropout._mul_hi_by_halves(jnp.asarray(a), m)), want)
    np.testing.assert_array_equal(np.asarray(dropout._mul_hi_lo(jnp.asarray(a), m)[0]), want)


def test_each_activation_takes_its_own_16_bits_of_its_call():
  key = jax.random.key(3, impl="philox4x32")
  shape = (3, 5, 7)  # 105 activations: 14 calls, the last one used in part
  mask = np.asarray(dropout.keep_mask(key, 0.9, shape)).reshape(-1)
  k0, k1 = np.asarray(jax.random.key_data(key))
  words = np.stack([np.asarray(w) for w in dropout.philox4x32((k0, k1), (np.arange(14, dtype=np.uint32), 0, 0, 0))],
                   axis=-1)  # [14, 4]
  uniforms = np.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(-1)[:105]  # call c: activations 8c … 8c + 7
  np.testing.assert_array_equal(mask, uniforms < 58982)
  assert dropout.keep_threshold(0.9) == 58982 and dropout.keep_threshold(1.0) == 65536
  with pytest.raises(ValueError, match="keep_prob: expected a probability"):
    dropout.keep_threshold(0.0)


def test_masks_keep_the_rounded_rate_and_neighbours_are_independent():
  n = 1 << 21
  key = jax.random.key(11, impl="philox4x32")
  for keep_prob in (0.9, 0.5, 0.01):
    p = dropout.keep_threshold(keep_prob) / 65536
    mask = np.asarray(dropout.keep_mask(key, keep_prob, (n,)), np.float64)
    assert abs(mask.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    centred = mask - mask.mean()
    # Lag 1: the two halves of a word; lag 2: two words of a call; lag 8: consecutive calls.
    for lag in (1, 2, 8):
      corr = np.mean(centred[:-lag] * centred[lag:]) / mask.var()
      assert abs(corr) < 5 / np.sqrt(n), (keep_prob, lag, corr)
  # Another key, another mask; the same key, the same mask.
  other = np.asarray(dropout.keep_mask(jax.random.key(12, impl="philox4x32"), 0.9, (n,)))
  assert 0.15 < np.mean(other != np.asarray(dropout.keep_mask(key, 0.9, (n,)))) < 0.21  # 2 p (1 - p) = 0.18
  np.testing.assert_array_equal(dropout.keep_mask(key, 0.9, (n,)), dropout.keep_mask(key, 0.9, (n,)))


class _Block(nn.Module):
  """A dropout layer where a network has one, to compare keys by module path."""
  flax_module: bool

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(x.shape[-1])(x)
    if self.flax_module:
      return nn.Dropout(0.1)(x, deterministic=False)
    return dropout.Dropout(0.1)(x, False)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_dropout_is_flaxs_bit_for_bit_with_other_keys(impl):
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
  params = _Block(True).init(jax.random.key(1), x)
  rngs = {"dropout": jax.random.key(2, impl=impl)}
  np.testing.assert_array_equal(_Block(False).apply(params, x, rngs=rngs), _Block(True).apply(params, x, rngs=rngs))


def test_dropout_with_a_philox_key_scales_by_the_rounded_rate():
  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 32)) + 3.0  # no zeros among the inputs
  params = _Block(False).init(jax.random.key(1), x)
  hidden = nn.Dense(32).apply({"params": params["params"]["Dense_0"]}, x)
  out = np.asarray(_Block(False).apply(params, x, rngs={"dropout": jax.random.key(2, impl="philox4x32")}))
  kept = out != 0
  np.testing.assert_allclose(out[kept], np.asarray(hidden)[kept] * 65536 / 58982, rtol=1e-6)
  assert abs(kept.mean() - 58982 / 65536) < 5 * np.sqrt(0.09 / kept.size)
  assert dropout.Dropout(0.1).apply({}, x, True) is x  # deterministic: untouched
  np.testing.assert_array_equal(dropout.Dropout(1.0).apply({}, x, False, rngs={"dropout": jax.random.key(0)}), 0)

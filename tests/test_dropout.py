"""vdm.dropout: Threefry-2x32 against Random123's known answers; the masks' bits, rate, independence, sharding."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from vdm import dropout, training


def _threefry(key, counters):
  k0, k1 = (np.uint32(k) for k in key)
  x0, x1 = (jnp.asarray(np.asarray(c, np.uint32)) for c in counters)
  return [np.asarray(w) for w in jex_random.threefry2x32_p.bind(k0, k1, x0, x1)]


def test_the_generator_gives_random123s_known_answers():
  # Random123's kat_vectors for threefry2x32 with 20 rounds: (counter, key) -> output.
  for counter, key, want in [([0, 0], [0, 0], ["6b200159", "99ba4efe"]),
                             ([0xFFFFFFFF] * 2, [0xFFFFFFFF] * 2, ["1cb996fc", "bb002be7"]),
                             ([0x243F6A88, 0x85A308D3], [0x13198A2E, 0x03707344], ["c4923a9c", "483df7a0"])]:
    words = _threefry(key, [[counter[0]], [counter[1]]])
    assert [f"{int(w[0]):08x}" for w in words] == want


def _uniforms(key, examples, calls):
  """[examples, 4, calls]: half q of call b × calls + j at (b, q, j), from JAX's Threefry."""
  counters = np.arange(examples * calls)
  w0, w1 = _threefry(np.asarray(jax.random.key_data(key)), [counters, np.zeros_like(counters)])
  halves = np.stack([w0 & 0xFFFF, w0 >> 16, w1 & 0xFFFF, w1 >> 16])  # [4, calls in all]
  return halves.reshape(4, examples, calls).transpose(1, 0, 2)


def test_each_activation_takes_its_own_16_bits_of_its_call():
  key = dropout.packed_key(jax.random.key(3))
  # An example of 8 × 3 × 2 = 48 activations: 12 calls each, its quarters (of 2 rows) a call's halves apart.
  mask = np.asarray(dropout.keep_mask(key, 0.9, (5, 8, 3, 2)))
  np.testing.assert_array_equal(mask.reshape(5, 4, 12), _uniforms(key, 5, 12) < 58982)
  assert dropout.quarters((5, 8, 3, 2)) == (5, 12)
  # Examples of 6 × 3 = 18 activations (the second axis not a multiple of 4, the example is), rank 1, and
  # 105 activations in no whole quarters (27 calls, the last one used in part): one "example".
  np.testing.assert_array_equal(np.asarray(dropout.keep_mask(key, 0.9, (2, 6, 2))).reshape(2, 4, 3),
                                _uniforms(key, 2, 3) < 58982)
  for shape in [(64,), (3, 5, 7)]:
    calls = -(-np.prod(shape) // 4)
    assert dropout.quarters(shape) == (1, calls)
    want = (_uniforms(key, 1, calls) < 58982).reshape(-1)[:np.prod(shape)].reshape(shape)
    np.testing.assert_array_equal(np.asarray(dropout.keep_mask(key, 0.9, shape)), want)
  assert dropout.keep_threshold(0.9) == 58982 and dropout.keep_threshold(1.0) == 65536
  with pytest.raises(ValueError, match="keep_prob: expected a probability"):
    dropout.keep_threshold(0.0)


def test_the_gpu_kernel_draws_the_same_mask_bit_for_bit():
  # The kernel's Threefry is JAX's (known answers included), and its mask is keep_mask's traced one, for any
  # key, counter and keep probability (Pallas's interpreter here; Triton on GPUs).
  for key, counter in [([0, 0], [0, 0]), ([0xFFFFFFFF] * 2, [0xFFFFFFFF] * 2),
                       ([0x13198A2E, 0x03707344], [0x243F6A88, 0x85A308D3])]:
    words = dropout._threefry(*(jnp.uint32(k) for k in key), *(jnp.asarray([c], jnp.uint32) for c in counter))
    np.testing.assert_array_equal(np.stack(words), np.stack(_threefry(key, [[counter[0]], [counter[1]]])))
  examples, calls = 3, 2 * dropout.KERNEL_CALLS  # two programs an example
  for seed, keep_prob in [(3, 0.9), (4, 0.5), (5, 1.0)]:
    key = dropout.packed_key(jax.random.key(seed))
    k0, k1 = jax.random.key_data(key).astype(jnp.uint32)
    threshold = dropout.keep_threshold(keep_prob)
    got = dropout.mask_kernel(k0, k1, examples, calls, threshold, interpret=True)
    assert got.shape == (examples, 4, calls) and got.dtype == jnp.int8
    want = dropout.keep_mask(key, keep_prob, (examples, 16, calls // 8, 2))  # traced off GPUs
    np.testing.assert_array_equal(np.asarray(got).reshape(want.shape) != 0, want)
    np.testing.assert_array_equal(np.asarray(got) != 0, _uniforms(key, examples, calls) < threshold)
    assert abs(float(want.mean()) - threshold / 65536) < 0.02
    # A device's share of a larger batch: its examples' bits, from the first one's counters (traced_mask's).
    part = dropout.mask_kernel(k0, k1, 2, calls, threshold, interpret=True, first=jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(part), np.asarray(got)[1:])


def test_masks_keep_the_rounded_rate_and_neighbours_are_independent():
  n = 1 << 21
  key = dropout.packed_key(jax.random.key(11))
  for keep_prob in (0.9, 0.5, 0.01):
    p = dropout.keep_threshold(keep_prob) / 65536
    mask = np.asarray(dropout.keep_mask(key, keep_prob, (n,)), np.float64)
    assert abs(mask.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    centred = mask - mask.mean()
    # Lag n/4: the halves of one call (one example of n activations); lags 1 and 4: neighbouring calls.
    for lag in (1, 4, n // 4, n // 2):
      corr = np.mean(centred[:-lag] * centred[lag:]) / mask.var()
      assert abs(corr) < 5 / np.sqrt(n), (keep_prob, lag, corr)
  # Another key, another mask; the same key, the same mask; a packed key splits and folds in as threefry.
  other = np.asarray(dropout.keep_mask(jax.random.fold_in(key, 1), 0.9, (n,)))
  assert 0.15 < np.mean(other != np.asarray(dropout.keep_mask(key, 0.9, (n,)))) < 0.21  # 2 p (1 - p) = 0.18
  np.testing.assert_array_equal(dropout.keep_mask(key, 0.9, (n,)), dropout.keep_mask(key, 0.9, (n,)))
  np.testing.assert_array_equal(jax.random.key_data(jax.random.fold_in(key, 7)),
                                jax.random.key_data(jax.random.fold_in(jax.random.key(11), 7)))
  assert jax.random.key_impl(jax.random.split(key)[0]) == dropout.PACKED


class _Block(nn.Module):
  """A dropout layer where a network has one, to compare keys by module path."""
  flax_module: bool

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(x.shape[-1])(x)
    if self.flax_module:
      return nn.Dropout(0.1)(x, deterministic=False)
    return dropout.Dropout(0.1)(x, False)


@pytest.mark.parametrize("impl", ["threefry2x32", "philox4x32", "rbg"])
def test_dropout_is_flaxs_bit_for_bit_with_other_keys(impl):
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
  params = _Block(True).init(jax.random.key(1), x)
  rngs = {"dropout": jax.random.key(2, impl=impl)}
  np.testing.assert_array_equal(_Block(False).apply(params, x, rngs=rngs), _Block(True).apply(params, x, rngs=rngs))


def test_dropout_with_a_packed_key_scales_by_the_rounded_rate():
  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 32)) + 3.0  # no zeros among the inputs
  params = _Block(False).init(jax.random.key(1), x)
  hidden = nn.Dense(32).apply({"params": params["params"]["Dense_0"]}, x)
  out = np.asarray(_Block(False).apply(params, x, rngs={"dropout": dropout.packed_key(jax.random.key(2))}))
  kept = out != 0
  np.testing.assert_allclose(out[kept], np.asarray(hidden)[kept] * 65536 / 58982, rtol=1e-6)
  assert abs(kept.mean() - 58982 / 65536) < 5 * np.sqrt(0.09 / kept.size)
  assert dropout.Dropout(0.1).apply({}, x, True) is x  # deterministic: untouched
  np.testing.assert_array_equal(dropout.Dropout(1.0).apply({}, x, False, rngs={"dropout": jax.random.key(0)}), 0)


@pytest.mark.parametrize("key", [jax.random.key(3), dropout.packed_key(jax.random.key(3))])
def test_bfloat16_activations_are_divided_by_the_keep_probability_itself(key):
  # flax divides bf16 activations by the keep probability rounded to bf16 (0.9 → 0.8984375): every kept
  # activation 0.18 % too large. Here the kept ones are x / p to bf16 rounding, unbiased over many.
  x = (jax.random.normal(jax.random.key(0), (1 << 18,)) + 5.0).astype(jnp.bfloat16)  # no zeros
  out = dropout.Dropout(0.1).apply({}, x, False, rngs={"dropout": key})
  keep = np.asarray(out) != 0
  keep_prob = dropout.draw_keep(key, 0.9, (1,))[1]  # 0.9, or 58982 / 65536 for a packed key
  assert out.dtype == jnp.bfloat16 and abs(keep.mean() - keep_prob) < 5 * np.sqrt(0.09 / keep.size)
  exact = np.asarray(x, np.float64)[keep] / keep_prob
  ratio = np.asarray(out, np.float64)[keep] / exact
  assert np.max(np.abs(ratio - 1)) <= 2.0**-8  # one bf16 rounding (8 significant bits)
  assert abs(np.mean(ratio) - 1) < 1e-4
  if keep_prob == 0.9:  # the same mask as ours: flax's bias, the reason for the float32 division
    flax_out = nn.Dropout(0.1).apply({}, x, False, rngs={"dropout": key})
    assert np.mean(np.asarray(flax_out, np.float64)[keep] / exact) - 1 > 1.5e-3


def test_a_mask_is_the_same_when_the_batch_is_sharded_over_devices():
  # XLA partitions the counters' iota: each device draws its own rows of the same mask. Traced for the mesh
  # (vdm.sharding.on_mesh, as the train step is), each device draws its own examples from their counters.
  script = (
      "import jax, numpy as np\n"
      "from jax.sharding import Mesh, NamedSharding, PartitionSpec as P\n"
      "from vdm import dropout, sharding\n"
      "mesh = Mesh(np.asarray(jax.devices()), ('data',))\n"
      "key = dropout.packed_key(jax.random.key(5))\n"
      "draw = lambda k: dropout.keep_mask(k, 0.9, (8, 6, 6, 16))\n"
      "whole = np.asarray(jax.jit(draw)(key))\n"
      "for fn in (draw, sharding.on_mesh(draw, mesh)):\n"
      "  sharded = jax.jit(fn, out_shardings=NamedSharding(mesh, P('data')))(key)\n"
      "  assert len(sharded.sharding.device_set) == 4\n"
      "  np.testing.assert_array_equal(np.asarray(sharded), whole)\n"
      "assert 'shard_map' in str(jax.make_jaxpr(sharding.on_mesh(draw, mesh))(key))\n"
      "print('same')\n")
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4", NPROC="16", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == "same", proc.stderr[-2000:]


def test_a_part_of_the_batch_drawn_from_its_first_example_is_that_part_of_the_whole_mask():
  k0, k1 = jnp.uint32(3), jnp.uint32(9)
  threshold = dropout.keep_threshold(0.9)
  for shape in ((8, 4, 6, 16), (6, 3, 4)):  # calls laid out along axis 1, and as [examples, calls]
    whole = np.asarray(dropout.traced_mask(k0, k1, shape, threshold))
    part = (shape[0] // 2,) + shape[1:]
    halves = [np.asarray(dropout.traced_mask(k0, k1, part, threshold, first=first)) for first in (0, shape[0] // 2)]
    np.testing.assert_array_equal(np.concatenate(halves), whole)
    assert not np.array_equal(halves[0], halves[1])


def test_the_environment_can_turn_the_mask_kernel_off(monkeypatch):
  # On one device the GPU branch holds the kernel (traced here, never lowered off GPUs); VDM_DROPOUT_KERNEL=0
  # leaves only the traced mask, and several devices always do (a custom call is not split over the batch).
  key = dropout.packed_key(jax.random.key(0))
  program = lambda: str(jax.make_jaxpr(lambda k: dropout.keep_bytes(k, 0.9, (4, 4096)))(key))  # noqa: E731
  assert ("pallas_call" in program()) == (jax.device_count() == 1)
  monkeypatch.setenv("VDM_DROPOUT_KERNEL", "0")
  assert not dropout.kernel_enabled() and "pallas_call" not in program()
  assert dropout.keep_bytes(key, 0.9, (4, 4096)).dtype == jnp.int8


def test_the_mask_kernel_is_checked_once_and_turned_off_where_it_is_wrong(monkeypatch):
  # What training.setup runs on one GPU, here in the interpreter: the kernel against the traced mask.
  monkeypatch.setattr(dropout, "_checked", [])
  assert dropout.check_kernel(interpret=True) is None and dropout.kernel_enabled()
  monkeypatch.setattr(dropout, "_checked", [])
  assert dropout.check_kernel() is None  # off GPUs: nothing to check, the traced mask runs anyway
  right = dropout.mask_kernel
  for wrong, why in ((lambda *a, **k: 1 - right(*a, **k), "differ from the traced mask"),
                     (lambda *a, **k: 1 / 0, "ZeroDivisionError")):
    monkeypatch.setattr(dropout, "_checked", [])
    monkeypatch.setattr(dropout, "mask_kernel", wrong)
    failure = dropout.check_kernel(interpret=True)
    assert why in failure and failure.endswith("the traced mask instead"), failure
    assert not dropout.kernel_enabled() and dropout.check_kernel() == failure
    key = dropout.packed_key(jax.random.key(0))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda k: dropout.keep_bytes(k, 0.9, (4, 4096)))(key))


def test_setup_checks_the_mask_kernel_for_packed_masks_only(monkeypatch):
  calls = []
  monkeypatch.setattr(dropout, "check_kernel", lambda: calls.append(1) or "the kernel is wrong")
  for rng, rate, checked in (("packed", 0.1, True), ("packed", 0.0, False), ("threefry", 0.1, False)):
    config = smoke.get_config()
    config.execution.dropout_rng, config.model.network.dropout = rng, rate
    calls.clear()
    training.setup(config, (8, 8, 1))
    assert calls == ([1] if checked else [])

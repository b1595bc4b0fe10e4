"""The score U-Net: shapes, ε̂ = z at init, scanned ≡ unrolled, size."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from vdm import networks


def _tiny(**kw):
  args = dict(channels=16, num_blocks=2, dropout=0.1, fourier_exponents=(6, 7))
  args.update(kw)
  return networks.ScoreUNet(**args)


def _perturbed(params, seed=0, scale=0.05):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.mark.parametrize("shape", [(2, 8, 8, 1), (3, 8, 8, 3), (1, 12, 10, 2)])
def test_output_shape_and_identity_at_init(shape):
  net = _tiny(attention_everywhere=True)
  z = jax.random.normal(jax.random.key(0), shape)
  params = jax.jit(net.init)(jax.random.key(1), z, jnp.zeros(shape[0]))
  eps_hat = jax.jit(net.apply)(params, z, jnp.full(shape[0], -3.0))
  assert eps_hat.shape == shape and eps_hat.dtype == jnp.float32
  np.testing.assert_array_equal(eps_hat, z)  # zero-initialised output convolutions


@pytest.mark.parametrize("attention", [False, True])
def test_scanned_and_unrolled_forms_are_the_same_function(attention):
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  gamma = jnp.array([-10.0, 2.0])
  scanned = _tiny(attention_everywhere=attention)
  params = _perturbed(jax.jit(scanned.init)(jax.random.key(1), z, gamma)["params"])
  out = jax.jit(scanned.apply)({"params": params}, z, gamma)
  unrolled = _tiny(attention_everywhere=attention, scan_blocks=False)
  out_unrolled = jax.jit(unrolled.apply)({"params": networks.unstack_params(params, 2)}, z, gamma)
  assert float(jnp.abs(out - z).max()) > 1e-2  # the perturbed network is not the identity
  np.testing.assert_allclose(out, out_unrolled, rtol=1e-5, atol=1e-5)
  remat = _tiny(attention_everywhere=attention, remat=True)
  np.testing.assert_allclose(jax.jit(remat.apply)({"params": params}, z, gamma), out, rtol=1e-5, atol=1e-5)
  # Same structure as the unrolled form's own init.
  own = jax.jit(unrolled.init)(jax.random.key(1), z, gamma)["params"]
  assert jax.tree.structure(own) == jax.tree.structure(networks.unstack_params(params, 2))


def test_gamma_and_conditioning_change_the_output_and_dropout_is_train_only():
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  net = _tiny(dropout=0.5)
  cond = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  params = _perturbed(jax.jit(net.init)(jax.random.key(1), z, jnp.zeros(2), cond)["params"], scale=0.2)
  apply = jax.jit(lambda g, c, k: net.apply({"params": params}, z, jnp.full(2, g), c))
  apply_train = jax.jit(lambda g, c, k: net.apply({"params": params}, z, jnp.full(2, g), c, train=True,
                                                  rngs={"dropout": k}))
  f = lambda g, c=cond: apply(g, c, None)  # noqa: E731
  assert float(jnp.abs(f(-5.0) - f(3.0)).max()) > 1e-3
  assert float(jnp.abs(f(0.0) - f(0.0, cond[::-1])).max()) > 1e-3
  np.testing.assert_array_equal(f(0.0), f(0.0))
  train = lambda k: apply_train(0.0, cond, jax.random.key(k))  # noqa: E731
  assert float(jnp.abs(train(0) - train(1)).max()) > 1e-3


def test_fourier_features_closed_form():
  z = jnp.array([[[[0.1, -0.3]]]])
  got = networks.fourier_features(z, (6, 7))
  w = 2 * np.pi * np.array([64.0, 128.0])
  h = np.array([0.1 * w[0], 0.1 * w[1], -0.3 * w[0], -0.3 * w[1]])
  np.testing.assert_allclose(got[0, 0, 0], np.concatenate([np.sin(h), np.cos(h)]), rtol=1e-4, atol=1e-5)


def test_timestep_embedding_shape_and_values():
  emb = networks.timestep_embedding(jnp.array([0.0, 500.0]), 8)
  assert emb.shape == (2, 8)
  np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
  freqs = np.exp(-np.log(10_000) * np.arange(4) / 3)
  np.testing.assert_allclose(emb[1, :4], np.sin(500 * freqs), rtol=1e-4, atol=1e-4)


def test_cifar10_network_size():
  """The paper's CIFAR-10 network: 32 blocks × 128 channels, Fourier features."""
  net = networks.ScoreUNet(channels=128, num_blocks=32, dropout=0.1, fourier_exponents=(6, 7))
  shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros(1))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  print(f"CIFAR-10 ScoreUNet parameters: {count:,}")
  # Published: 30.6 M for the paper's model (REFERENCES.md).
  assert 30.0e6 < count < 31.5e6

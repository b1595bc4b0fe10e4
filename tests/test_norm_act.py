"""GroupNorm–swish–dropout with a hand-written gradient (vdm.norm_act, execution.fused_norm): the same function."""

import re

import flax.linen as nn
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from perturbation import perturbed
from vdm import networks, norm_act


def _flax_reference(x, scale, bias, groups, keep=None, rate=0.0):
  """What the network computed before: nn.GroupNorm, nn.swish, then nn.Dropout's masking."""
  y = nn.GroupNorm(num_groups=groups, dtype=x.dtype, param_dtype=x.dtype).apply(
      {"params": {"scale": scale, "bias": bias}}, x)
  y = nn.swish(y)
  return y if keep is None else jnp.where(keep, y / (1.0 - rate), 0.0)


@pytest.mark.parametrize("shape,groups", [((3, 5, 4, 16), 4), ((2, 3, 3, 8), 8), ((2, 6, 6, 12), 1)])
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_value_and_gradient_equal_flax_groupnorm_swish_dropout_in_float64(shape, groups, rate):
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = jnp.asarray(2.0 * rng.standard_normal(shape) + 0.5)
    scale, bias = jnp.asarray(rng.standard_normal(shape[-1])), jnp.asarray(rng.standard_normal(shape[-1]))
    keep = jnp.asarray(rng.random(shape) > rate) if rate else None
    cotangent = jnp.asarray(rng.standard_normal(shape))
    fused = lambda x, s, b: norm_act.group_norm_swish(x, s, b, groups, keep=keep, rate=rate)  # noqa: E731
    plain = lambda x, s, b: _flax_reference(x, s, b, groups, keep, rate)  # noqa: E731
    y, vjp = jax.vjp(fused, x, scale, bias)
    y_ref, vjp_ref = jax.vjp(plain, x, scale, bias)
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(vjp(cotangent), vjp_ref(cotangent)):
      np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11 * float(jnp.abs(b).max()))
    if keep is not None:
      assert not bool(jnp.any(jnp.where(keep, 0.0, y)))  # dropped activations are zero


def test_bfloat16_activations_float32_statistics_and_parameter_gradients():
  rng = np.random.default_rng(1)
  shape, groups = (2, 8, 8, 16), 4
  x64 = 3.0 * rng.standard_normal(shape) + 1.0
  scale, bias = jnp.asarray(1 + 0.1 * rng.standard_normal(16), jnp.float32), jnp.zeros(16, jnp.float32)
  x = jnp.asarray(x64, jnp.bfloat16)
  cotangent = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  y, vjp = jax.vjp(lambda x, s, b: norm_act.group_norm_swish(x, s, b, groups), x, scale, bias)
  dx, dscale, dbias = vjp(cotangent)
  assert (y.dtype, dx.dtype, dscale.dtype, dbias.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.float32)
  with jax.enable_x64(True):  # the exact function of the bf16 input, in float64
    xe, ce = jnp.asarray(x, jnp.float64), jnp.asarray(cotangent, jnp.float64)
    ref, vjp_ref = jax.vjp(lambda x, s, b: _flax_reference(x, s, b, groups), xe, scale.astype(jnp.float64),
                           bias.astype(jnp.float64))
    refs = vjp_ref(ce)
  # Only the output's rounding to bf16 (relative 2^-9) and float32 sums separate the two.
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2 ** -8, atol=1e-3)
  for a, b in zip((dx, dscale, dbias), refs):
    b = np.asarray(b)
    assert float(np.abs(np.asarray(a, np.float64) - b).max()) <= 2 ** -7 * float(np.abs(b).max())


def test_bad_arguments_are_named():
  x = jnp.zeros((1, 4, 4, 6))
  with pytest.raises(ValueError, match="num_groups: 4 does not divide the 6 channels"):
    norm_act.group_norm_swish(x, jnp.ones(6), jnp.zeros(6), 4)
  with pytest.raises(ValueError, match="keep: expected the shape of x"):
    norm_act.group_norm_swish(x, jnp.ones(6), jnp.zeros(6), 3, keep=jnp.ones((1, 4, 4, 3), bool), rate=0.1)


def test_dropout_masks_are_nn_dropouts():
  """The network draws its masks with _DropoutMask: the bits nn.Dropout drew, so the training is unchanged."""
  class Old(nn.Module):
    @nn.compact
    def __call__(self, h):
      return nn.Dropout(0.3)(h, deterministic=False)

  class New(nn.Module):
    @nn.compact
    def __call__(self, h):
      keep = networks._DropoutMask(0.3, name="Dropout_0")(h.shape)
      return jnp.where(keep, h / 0.7, jnp.zeros_like(h))

  h = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)) + 3.0
  rngs = {"dropout": jax.random.key(5)}
  np.testing.assert_array_equal(Old().apply({}, h, rngs=rngs), New().apply({}, h, rngs=rngs))


def _big_reductions(lowered_text: str, size: int) -> int:
  """Reductions in a lowered program whose input has at least ``size`` elements: passes over activations."""
  count = 0
  for operand in re.findall(r"stablehlo\.reduce\(.*?: \(tensor<([0-9x]+)x(?:f32|f64|bf16)>", lowered_text):
    count += int(np.prod([int(d) for d in operand.split("x")])) >= size
  return count


@pytest.mark.parametrize("skip_concat", networks.SKIP_CONCATS)
def test_fused_norm_network_is_the_same_function(skip_concat):
  """fused_norm: the same parameters and init, the same output and gradient in float64 (dropout on, the same
  masks); with remat_policy "convs_masks" the recomputed forward pass reduces nothing."""
  net = lambda **kw: networks.ScoreUNet(channels=16, num_blocks=2, dropout=0.3, skip_concat=skip_concat,  # noqa: E731
                                        dtype=jnp.float64, **kw)
  with jax.enable_x64(True):
    z = jax.random.normal(jax.random.key(0), (2, 8, 8, 3), jnp.float64)
    gamma = jnp.array([-10.0, 2.0])
    inits = [jax.jit(net(fused_norm=f).init)(jax.random.key(1), z, gamma)["params"] for f in (False, True)]
    assert jax.tree.structure(inits[0]) == jax.tree.structure(inits[1])
    for a, b in zip(*map(jax.tree.leaves, inits)):
      np.testing.assert_array_equal(a, b)
    params = perturbed(inits[0], dtype=np.float64)

    def lowered(**kw):
      loss = lambda p: jnp.sum(net(**kw).apply({"params": p}, z, gamma, train=True,  # noqa: E731
                                               rngs={"dropout": jax.random.key(2)}) ** 2)
      return jax.jit(jax.value_and_grad(loss)).lower(params)

    programs = {
        "plain": lowered(),
        "fused": lowered(fused_norm=True),
        "fused_remat": lowered(fused_norm=True, remat=True, remat_policy="convs_masks"),
    }
    (loss, grads), *others = (program.compile()(params) for program in programs.values())
    for other_loss, other_grads in others:
      np.testing.assert_allclose(other_loss, loss, rtol=1e-6)  # to the rounding of ε̂, which is float32
      for a, b in zip(jax.tree.leaves(other_grads), jax.tree.leaves(grads)):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(b).max()) + 1e-12
    passes = {name: _big_reductions(program.as_text(), 2 * 8 * 8 * 16) for name, program in programs.items()}
    assert passes["fused_remat"] == passes["fused"]  # the statistics are kept, not reduced again


def test_fused_norm_in_bfloat16_is_close_to_the_plain_network():
  net = lambda **kw: networks.ScoreUNet(channels=16, num_blocks=2, dropout=0.0, dtype=jnp.bfloat16,  # noqa: E731
                                        skip_concat="after_norm", **kw)
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  gamma = jnp.array([-10.0, 2.0])
  params = perturbed(jax.jit(net().init)(jax.random.key(1), z, gamma)["params"])
  plain, fused = (jax.jit(net(fused_norm=f).apply)({"params": params}, z, gamma) for f in (False, True))
  assert plain.dtype == fused.dtype == jnp.float32
  change = float(jnp.abs(plain - z).max())
  assert change > 1e-2  # the perturbed network is not the identity
  # The plain network rounds the norm's output to bf16 before swish; the fused one after.
  assert float(jnp.abs(fused - plain).max()) <= 0.05 * change

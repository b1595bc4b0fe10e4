"""The score U-Net: shapes, ε̂ = z at init, scanned ≡ unrolled, size."""

import types

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from perturbation import perturbed
from vdm import convolution, networks


def _tiny(**kw):
  args = dict(channels=16, num_blocks=2, dropout=0.1, fourier_exponents=(6, 7))
  args.update(kw)
  return networks.ScoreUNet(**args)


@pytest.mark.parametrize("shape", [(2, 8, 8, 1), (3, 8, 8, 3), (1, 12, 10, 2)])
def test_output_shape_and_identity_at_init(shape):
  net = _tiny(attention_everywhere=True, channel_mult=(1, 2) if shape[1] % 2 == 0 and shape[2] % 2 == 0 else (1,))
  z = jax.random.normal(jax.random.key(0), shape)
  params = jax.jit(net.init)(jax.random.key(1), z, jnp.zeros(shape[0]))
  eps_hat = jax.jit(net.apply)(params, z, jnp.full(shape[0], -3.0))
  assert eps_hat.shape == shape and eps_hat.dtype == jnp.float32
  np.testing.assert_array_equal(eps_hat, z)  # zero-initialised output convolutions


def test_patches_are_channels_and_back():
  x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
  y = networks.space_to_depth(x, 2)
  assert y.shape == (2, 4, 3, 12)
  # Patch (r, c) holds pixels (2r + i, 2c + j) as channels (2i + j)·C …: row-major within the patch.
  np.testing.assert_array_equal(y[1, 2, 1].reshape(2, 2, 3), x[1, 4:6, 2:4])
  np.testing.assert_array_equal(networks.depth_to_space(y, 2), x)
  assert networks.space_to_depth(x, 1) is x


def test_a_network_on_patches_has_no_full_resolution_level_and_is_the_identity_at_init():
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  net = _tiny(channel_mult=(1, 2), patch_size=2)
  params = jax.jit(net.init)(jax.random.key(1), z, jnp.zeros(2))
  np.testing.assert_array_equal(jax.jit(net.apply)(params, z, jnp.full(2, -3.0)), z)
  shapes = jax.tree.map(lambda p: p.shape, params["params"])
  assert shapes["conv_in"]["kernel"] == (3, 3, 4 * 5, 16)  # 2×2 patches of z and its 4 Fourier features
  assert shapes["conv_out"]["kernel"] == (3, 3, 16, 4)
  params = {"params": perturbed(params["params"], scale=0.2)}
  eps_hat = jax.jit(net.apply)(params, z, jnp.full(2, -3.0))
  assert eps_hat.shape == z.shape and float(jnp.abs(eps_hat - z).max()) > 1e-2
  # Without Fourier features (made per pixel, before the patches) the same parameters are a network on the
  # 4×4×4 patched image: the output goes back to the pixels it came from.
  bare = dict(channel_mult=(1, 2), fourier_exponents=(), input_skip=False)
  on_patches, on_pixels = _tiny(patch_size=2, **bare), _tiny(**bare)
  params = {"params": perturbed(jax.jit(on_patches.init)(jax.random.key(1), z, jnp.zeros(2))["params"], scale=0.2)}
  np.testing.assert_allclose(jax.jit(on_patches.apply)(params, z, jnp.full(2, -3.0)), networks.depth_to_space(
      jax.jit(on_pixels.apply)(params, networks.space_to_depth(z, 2), jnp.full(2, -3.0)), 2), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="channel_mult: 2 resolution levels on 2×2 patches need height and width "
                                       "divisible by 4, got 6×6"):
    net.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)), jnp.zeros(1))


def test_without_the_input_skip_the_output_is_the_network_alone():
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  gamma = jnp.array([-3.0, 4.0])
  net, bare = _tiny(channel_mult=(1, 2)), _tiny(channel_mult=(1, 2), input_skip=False)
  params = jax.jit(net.init)(jax.random.key(1), z, jnp.zeros(2))
  np.testing.assert_array_equal(jax.jit(bare.apply)(params, z, gamma), 0.0)  # F = 0 at init: v̂ = 0, not z
  params = {"params": perturbed(params["params"], scale=0.2)}
  with_skip, without = jax.jit(net.apply)(params, z, gamma), jax.jit(bare.apply)(params, z, gamma)
  assert float(jnp.abs(without).max()) > 1e-2
  np.testing.assert_allclose(with_skip - without, z, atol=1e-5)  # the same F, the same parameters


@pytest.mark.parametrize("attention,mult", [(False, (1,)), (True, (1,)), (False, (1, 2))])
def test_scanned_and_unrolled_forms_are_the_same_function(attention, mult):
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  gamma = jnp.array([-10.0, 2.0])
  scanned = _tiny(attention_everywhere=attention, channel_mult=mult)
  params = perturbed(jax.jit(scanned.init)(jax.random.key(1), z, gamma)["params"])
  out = jax.jit(scanned.apply)({"params": params}, z, gamma)
  unrolled = _tiny(attention_everywhere=attention, channel_mult=mult, scan_blocks=False)
  unstacked = networks.unstack_params(params, 2, len(mult))
  out_unrolled = jax.jit(unrolled.apply)({"params": unstacked}, z, gamma)
  assert float(jnp.abs(out - z).max()) > 1e-2  # the perturbed network is not the identity
  np.testing.assert_allclose(out, out_unrolled, rtol=1e-5, atol=1e-5)
  # The same gradient too: a scanned stack projects every block's conditioning before its loop, from the
  # stacked Dense_0 kernels, where the unrolled blocks each project their own.
  loss = lambda net: lambda p: jnp.sum(net.apply({"params": p}, z, gamma) ** 2)  # noqa: E731
  grad = networks.unstack_params(jax.jit(jax.grad(loss(scanned)))(params), 2, len(mult))
  grad_unrolled = jax.jit(jax.grad(loss(unrolled)))(unstacked)
  assert float(jnp.abs(grad["up_1"]["resnet"]["Dense_0"]["kernel"]).max()) > 1e-3
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grad), jax.tree.leaves(grad_unrolled)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  remat = _tiny(attention_everywhere=attention, channel_mult=mult, remat=True)
  np.testing.assert_allclose(jax.jit(remat.apply)({"params": params}, z, gamma), out, rtol=1e-5, atol=1e-5)
  for k in (2, 64):  # two blocks per iteration; every block of a stack in one (no loop: straight-line code)
    unroll = _tiny(attention_everywhere=attention, channel_mult=mult, scan_unroll=k)
    np.testing.assert_allclose(jax.jit(unroll.apply)({"params": params}, z, gamma), out, rtol=1e-5, atol=1e-5)
  # Same structure as the unrolled form's own init, and stacking is the inverse.
  own = jax.jit(unrolled.init)(jax.random.key(1), z, gamma)["params"]
  assert jax.tree.structure(own) == jax.tree.structure(unstacked)
  restacked = networks.stack_params(unstacked, 2, len(mult))
  assert jax.tree.structure(restacked) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(restacked), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_levels_halve_the_resolution_and_widen_as_asked():
  net = _tiny(channel_mult=(1, 2, 4), num_blocks=1, fourier_exponents=())
  shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 12, 8, 1)), jnp.zeros(1))["params"]
  # The first convolution of each level's blocks: its width; the mid blocks run at the lowest level.
  assert shapes["down"]["resnet"]["Conv_0"]["kernel"].shape[-1] == 16
  assert shapes["down1"]["resnet"]["Conv_0"]["kernel"].shape[-1] == 32
  assert shapes["down2"]["resnet"]["Conv_0"]["kernel"].shape[-1] == 64
  assert shapes["mid_0"]["resnet"]["Conv_0"]["kernel"].shape[-1] == 64
  assert shapes["upsample_0"]["kernel"].shape[-2:] == (32, 16)
  with pytest.raises(ValueError, match="channel_mult: 3 resolution levels need height and width divisible by 4, "
                                       "got 12×6"):
    net.init(jax.random.key(0), jnp.zeros((1, 12, 6, 1)), jnp.zeros(1))


def test_gamma_and_conditioning_change_the_output_and_dropout_is_train_only():
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  net = _tiny(dropout=0.5)
  cond = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  params = perturbed(jax.jit(net.init)(jax.random.key(1), z, jnp.zeros(2), cond)["params"], scale=0.2)
  apply = jax.jit(lambda g, c, k: net.apply({"params": params}, z, jnp.full(2, g), c))
  apply_train = jax.jit(lambda g, c, k: net.apply({"params": params}, z, jnp.full(2, g), c, train=True,
                                                  rngs={"dropout": k}))
  f = lambda g, c=cond: apply(g, c, None)  # noqa: E731
  assert float(jnp.abs(f(-5.0) - f(3.0)).max()) > 1e-3
  assert float(jnp.abs(f(0.0) - f(0.0, cond[::-1])).max()) > 1e-3
  # Outside training dropout is off: the same as the network built without dropout.
  plain = jax.jit(lambda: _tiny(dropout=0.0).apply({"params": params}, z, jnp.full(2, 0.0), cond))()
  np.testing.assert_allclose(f(0.0), plain, rtol=1e-6, atol=1e-6)
  train = lambda k: apply_train(0.0, cond, jax.random.key(k))  # noqa: E731
  assert float(jnp.abs(train(0) - train(1)).max()) > 1e-3
  assert float(jnp.abs(train(0) - plain).max()) > 1e-3  # in training it is on


def test_bfloat16_network_sees_z_and_returns_eps_hat_in_float32():
  """bf16 spacing near 1 is 2^-8: rounded to it, z_t would lose ε at low noise. The input and output
  convolutions run in float32, so a change of z below that spacing still moves ε̂ − z (without Fourier
  features, the input convolution is the only way in), and the bf16 network stays close to float32's."""
  z = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1), minval=0.6, maxval=0.9)
  z = z.astype(jnp.bfloat16).astype(jnp.float32)  # on bf16's grid, so z + δ rounds back to z
  gamma = jnp.array([-13.0, -13.0])
  f32, bf16 = (_tiny(fourier_exponents=(), dropout=0.0, dtype=d) for d in (jnp.float32, jnp.bfloat16))
  params = perturbed(jax.jit(f32.init)(jax.random.key(1), z, gamma))
  delta = 2.0 ** -11  # an eighth of bf16's spacing here
  assert jnp.all(z.astype(jnp.bfloat16) == (z + delta).astype(jnp.bfloat16))
  out = lambda net, z: jax.jit(net.apply)(params, z, gamma) - z  # noqa: E731
  moved = out(bf16, z + delta) - out(bf16, z)
  assert out(bf16, z).dtype == jnp.float32
  assert float(jnp.abs(moved).max()) > 0
  np.testing.assert_allclose(moved, out(f32, z + delta) - out(f32, z), atol=0.05 * float(jnp.abs(out(f32, z)).max()))
  np.testing.assert_allclose(out(bf16, z), out(f32, z), atol=0.05 * float(jnp.abs(out(f32, z)).max()))


@pytest.mark.parametrize("mult", [(1,), (1, 2)])
def test_float32_residuals_carry_the_stream_in_float32_around_bfloat16_blocks(mult):
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  gamma = jnp.array([-5.0, 1.0])
  net = lambda **kw: _tiny(dtype=jnp.bfloat16, channel_mult=mult, dropout=0.0, **kw)  # noqa: E731
  params = perturbed(jax.jit(net().init)(jax.random.key(1), z, gamma))

  def carries(**kw):  # the dtypes of the scanned stacks' carried activations
    jaxpr = jax.make_jaxpr(net(**kw).apply)(params, z, gamma)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 2 * len(mult)
    return {str(v.aval.dtype) for e in scans for v in e.outvars[:e.params["num_carry"]] if v.aval.ndim == 4}

  assert carries() == {"bfloat16"} and carries(float32_residuals=True) == {"float32"}
  f32 = jax.jit(_tiny(channel_mult=mult, dropout=0.0).apply)(params, z, gamma)
  out = jax.jit(net(float32_residuals=True).apply)(params, z, gamma)
  assert out.dtype == jnp.float32 and not np.array_equal(out, f32)
  np.testing.assert_allclose(out, f32, atol=0.05 * float(jnp.abs(f32 - z).max()))
  lowered = lambda **kw: jax.jit(_tiny(channel_mult=mult, **kw).apply).lower(params, z, gamma).as_text()  # noqa: E731
  assert lowered(float32_residuals=True) == lowered()  # no effect in float32


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


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 0), (0, 1))])
@pytest.mark.parametrize("kernel", [(3, 3), (1, 1), (3, 2)])
def test_written_out_conv_gradient_equals_xlas_in_float64(padding, kernel):
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3), jnp.float64)
    k = jax.random.normal(jax.random.key(1), kernel + (3, 5), jnp.float64)

    def loss(conv):
      return lambda x, k: jnp.sum(jnp.sin(conv(x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))))
    ours = jax.jit(jax.grad(loss(convolution.conv_dot_grad), (0, 1)))(x, k)
    xla = jax.jit(jax.grad(loss(jax.lax.conv_general_dilated), (0, 1)))(x, k)
    assert ours[1].dtype == jnp.float64
    for a, b in zip(ours, xla):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv_grad", ["dot", "xla"])
def test_a_conv_with_its_bias_apart_is_flaxs_conv_bit_for_bit(conv_grad):
  # ResnetBlock's Conv_0 leaves its bias to the next norm's shift: the same parameters (names, init) as
  # nn.Conv, and output + bias is nn.Conv's output, in float32 and bf16.
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  for dtype in (jnp.float32, jnp.bfloat16):
    flax_conv = networks.nn.Conv(32, (3, 3), dtype=dtype, conv_general_dilated=convolution.conv_dot_grad
                                 if conv_grad == "dot" else None)
    apart = networks._ConvBiasApart(32, dtype, conv_grad)
    params = flax_conv.init(jax.random.key(1), x)
    init = apart.init(jax.random.key(1), x)
    assert jax.tree.structure(init) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(params)))
    params = perturbed(params)
    y, bias = apart.apply(params, x)
    assert y.dtype == bias.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y + bias, np.float32), np.asarray(flax_conv.apply(params, x), np.float32))


def test_conv_grad_choice_gives_the_same_network_gradient():
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  gamma = jnp.array([-10.0, 2.0])
  dot, xla = _tiny(dropout=0.0), _tiny(dropout=0.0, conv_grad="xla")
  params = perturbed(jax.jit(dot.init)(jax.random.key(1), z, gamma)["params"])
  grad = lambda net: jax.jit(jax.grad(lambda p: jnp.sum(net.apply({"params": p}, z, gamma) ** 2)))(params)  # noqa: E731
  for a, b in zip(jax.tree.leaves(grad(dot)), jax.tree.leaves(grad(xla))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("scan_blocks,conv_grad", [(True, "dot"), (False, "xla")])
def test_remat_policies_give_the_same_gradient_and_convs_recomputes_no_convolution(scan_blocks, conv_grad):
  net = lambda **kw: _tiny(dropout=0.3, scan_blocks=scan_blocks, conv_grad=conv_grad,  # noqa: E731
                           dtype=jnp.float64, **kw)
  with jax.enable_x64(True):
    z = jax.random.normal(jax.random.key(0), (2, 8, 8, 3), jnp.float64)
    gamma = jnp.array([-10.0, 2.0])
    params = perturbed(jax.jit(net().init)(jax.random.key(1), z, gamma)["params"], dtype=np.float64)

    def lowered_grad(module):
      loss = lambda p: jnp.sum(module.apply({"params": p}, z, gamma, train=True,  # noqa: E731
                                            rngs={"dropout": jax.random.key(2)}) ** 2)
      return jax.jit(jax.grad(loss)).lower(params)

    def convolutions(lowered):  # in the lowered gradient, before XLA could merge anything
      return lowered.as_text().count("stablehlo.convolution")

    plain = lowered_grad(net())
    reference = plain.compile()(params)
    assert jax.tree.leaves(reference)[0].dtype == jnp.float64
    # Scanned, "full" also runs two blocks per loop iteration: the same masks, the same gradient.
    unroll = dict(scan_unroll=2) if scan_blocks else {}
    variants = {"convs": lowered_grad(net(remat=True, remat_policy="convs")),
                "full": lowered_grad(net(remat=True, remat_policy="full", **unroll))}
    assert set(variants) == set(networks.REMAT_POLICIES)
    for lowered in variants.values():
      for a, b in zip(jax.tree.leaves(lowered.compile()(params)), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)  # dropout masks recomputed identically
    # "convs" keeps the convolution outputs; "full" runs the blocks' convolutions again.
    assert convolutions(variants["convs"]) == convolutions(plain)
    assert convolutions(variants["full"]) > convolutions(lowered_grad(net(**unroll)) if unroll else plain)
    # Scanned, the rematerialised blocks carry no barrier against CSE (prevent_cse=False): XLA may then read
    # the stacked residuals in place rather than copy each out first. Unrolled, the barrier stays.
    barriers = {name: lowered.as_text().count("optimization_barrier") for name, lowered in variants.items()}
    assert all(n == 0 for n in barriers.values()) if scan_blocks else all(n > 0 for n in barriers.values())
    if scan_blocks:  # every block of a stack in one iteration: the stacks' loops gone, the same gradient
      unrolled = lowered_grad(net(remat=True, remat_policy="convs", scan_unroll=64))
      loops = lambda lowered: lowered.as_text().count("stablehlo.while")  # noqa: E731  (threefry has its own)
      assert loops(unrolled) < loops(variants["convs"])
      for a, b in zip(jax.tree.leaves(unrolled.compile()(params)), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("projection", ["dense", "conv"])
def test_skips_joined_after_the_norm_are_the_same_function_of_the_same_parameters(projection):
  """execution.skip_concat="after_norm": input and skip normalised apart, then concatenated. Same init, same
  output and gradient (computed in float64); with one norm group (it straddles both parts) the paper's order
  is used: the same program."""
  net = lambda **kw: _tiny(dropout=0.3, dtype=jnp.float64, skip_projection=projection, **kw)  # noqa: E731
  forms = networks.SKIP_CONCATS
  with jax.enable_x64(True):
    z = jax.random.normal(jax.random.key(0), (2, 8, 8, 3), jnp.float64)
    gamma = jnp.array([-10.0, 2.0])
    params = {form: jax.jit(net(skip_concat=form).init)(jax.random.key(1), z, gamma)["params"] for form in forms}
    for a, b in zip(jax.tree.leaves(params["before_norm"]), jax.tree.leaves(params["after_norm"])):
      np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(params["before_norm"]) == jax.tree.structure(params["after_norm"])
    params = perturbed(params["before_norm"], dtype=np.float64)

    def lowered(form, norm_groups=0):
      loss = lambda p: jnp.sum(net(skip_concat=form, norm_groups=norm_groups).apply(  # noqa: E731
          {"params": p}, z, gamma, train=True, rngs={"dropout": jax.random.key(2)}) ** 2)
      return jax.jit(jax.value_and_grad(loss)).lower(params)

    programs = {form: lowered(form) for form in forms}
    convs = {form: programs[form].as_text().count("stablehlo.convolution") for form in forms}
    assert (convs["after_norm"] > convs["before_norm"]) == (projection == "conv")  # the projections' 1×1s
    (loss, grads), (loss_after, grads_after) = (programs[form].compile()(params) for form in forms)
    np.testing.assert_allclose(loss_after, loss, rtol=1e-6)  # to the rounding of ε̂, which is float32
    for a, b in zip(jax.tree.leaves(grads_after), jax.tree.leaves(grads)):
      assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(b).max()) + 1e-12
    # The up blocks' first GroupNorm reduces each part on its own: more reductions, the same function.
    count = lambda program: program.as_text().count("stablehlo.reduce")  # noqa: E731
    assert count(programs["after_norm"]) > count(programs["before_norm"])
    assert lowered("after_norm", norm_groups=1).as_text() == lowered("before_norm", norm_groups=1).as_text()
  with pytest.raises(ValueError, match="skip_concat: expected one of"):
    _tiny(skip_concat="after").init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)), jnp.zeros(1))
  with pytest.raises(ValueError, match=r"skip_projection: expected one of \('dense', 'conv'\), got 'gemm'"):
    _tiny(skip_projection="gemm").init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)), jnp.zeros(1))


@pytest.mark.parametrize("precision,expected", [("highest", "HIGHEST"), ("default", "DEFAULT")])
def test_matmul_precision_reaches_every_matmul_and_conv_forward_and_backward(precision, expected):
  net = _tiny(channels=8, num_blocks=1, matmul_precision=precision, attention_everywhere=True)
  z, gamma = jnp.zeros((1, 4, 4, 1)), jnp.zeros(1)
  params = jax.jit(net.init)(jax.random.key(0), z, gamma)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(net.apply(p, z, gamma))))(params)
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        found.append((eqn.primitive.name, str(eqn.params["precision"])))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
            walk(getattr(sub, "jaxpr", sub))
  walk(jaxpr.jaxpr)
  assert len({name for name, _ in found}) == 2 and len(found) > 20
  assert all(expected in precision for _, precision in found), found


def test_augmentation_conditioning_defaults_to_the_identity():
  z = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  net = _tiny(num_augmentations=8)
  params = perturbed(jax.jit(net.init)(jax.random.key(1), z, jnp.zeros(3))["params"], scale=0.2)
  apply = jax.jit(lambda codes: net.apply({"params": params}, z, jnp.zeros(3), codes))
  np.testing.assert_array_equal(apply(None), apply(jnp.zeros(3, jnp.int32)))
  assert float(jnp.abs(apply(None) - apply(jnp.array([0, 5, 7]))).max()) > 1e-3
  assert params["temb_0"]["kernel"].shape[0] == 16 + 8  # embedding + one-hot code


def test_bfloat16_stacks_cast_their_weights_once_and_compute_the_same(monkeypatch):
  # In bf16 a scanned stack's convolution and matmul weights are cast before its loop (one cast, not one
  # per block and pass); the norms' scale and bias stay float32. Bitwise the same output and gradient as
  # casting inside each block (flax's own promotion), which a norm parameter cast to bf16 would break.
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  gamma = jnp.array([-3.0, 1.0])
  net = _tiny(channel_mult=(1, 2), attention_everywhere=True, dtype=jnp.bfloat16, remat=True)
  params = perturbed(jax.jit(net.init)(jax.random.key(1), z, gamma)["params"])
  cast = networks._cast_weights(params["down"], jnp.bfloat16)
  assert cast["resnet"]["Conv_0"]["kernel"].dtype == jnp.bfloat16
  assert cast["resnet"]["GroupNorm_1"]["scale"].dtype == jnp.float32
  assert cast["attn"]["GroupNorm_0"]["bias"].dtype == jnp.float32
  loss = lambda p: jnp.sum(net.apply({"params": p}, z, gamma).astype(jnp.float32) ** 2)  # noqa: E731
  got = jax.jit(jax.value_and_grad(loss))(params)
  monkeypatch.setattr(networks, "_cast_weights", lambda tree, dtype: tree)
  want = jax.jit(jax.value_and_grad(loss))(params)
  assert float(jnp.abs(got[0])) > 0
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_attention_with_the_cudnn_kernel_is_flaxs_where_cudnn_does_not_apply(caplog):
  # Here no cuDNN: in float32 the kernel is not asked for, in bf16 it refuses when traced (logged once); both
  # give flax's attention, bit for bit. On a GPU the device check compares the two.
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
  for dtype in (jnp.float32, jnp.bfloat16):
    blocks = [networks.AttnBlock(dtype=dtype, kernel=kernel) for kernel in networks.ATTENTION_KERNELS]
    params = perturbed(blocks[0].init(jax.random.key(1), x))
    assert jax.tree.structure(blocks[1].init(jax.random.key(1), x)) == jax.tree.structure(params)
    caplog.clear()
    networks.warn_once.cache_clear()
    want, got = (block.apply(params, x) for block in blocks)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    warned = "attention: flax's, not cuDNN's fused kernel: RuntimeError: cuDNN is not detected" in caplog.text
    assert warned == (dtype == jnp.bfloat16)
  with pytest.raises(ValueError, match=r"attention_kernel: expected one of \('xla', 'cudnn'\), got 'flash'"):
    _tiny(attention_kernel="flash").init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)), jnp.zeros(1))


def test_attention_auto_is_cudnn_on_gpus_that_have_it(monkeypatch):
  from configs import cifar10
  from vdm import config as config_lib
  config = cifar10.get_config()
  assert config.execution.attention == "auto" and config_lib.resolve_attention("auto") == "xla"  # this CPU
  assert config_lib.build_model(config).network.attention_kernel == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for capability, kernel in (("9.0", "cudnn"), ("8.0", "cudnn"), ("7.5", "xla")):
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(compute_capability=capability)])
    assert config_lib.resolve_attention("auto") == kernel
  assert config_lib.resolve_attention("xla") == "xla"
  # cuDNN's attention has a backward pass, not a forward mode: a network for jax.jvp keeps XLA's.
  assert config_lib.build_model(config, for_eval=True, forward_mode=True).network.attention_kernel == "xla"
  config.execution.attention = "flash"
  with pytest.raises(config_lib.ConfigError, match=r"execution.attention: expected one of \('xla', 'cudnn', "
                                                   r"'auto'\), got 'flash'"):
    config_lib.validate(config)

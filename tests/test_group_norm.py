"""vdm.group_norm: the Pallas GroupNorm–swish kernels (in Pallas's interpreter here) against flax, in float64."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10
from vdm import config as config_lib
from vdm import dropout
from vdm import group_norm


def _inputs(shape, dtype=jnp.float64, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  b, c = shape[0], shape[-1]
  x = jax.random.normal(keys[0], shape, dtype) * 3.0 + 1.5  # a mean far from 0: the variance must not cancel
  shift = jax.random.normal(keys[1], (b, c), dtype)
  scale = 1.0 + 0.3 * jax.random.normal(keys[2], (c,), dtype)
  bias = 0.3 * jax.random.normal(keys[3], (c,), dtype)
  return x, shift, scale, bias, jax.random.normal(keys[4], shape, dtype)


def _flax(groups, swish):
  def f(x, shift, scale, bias):
    y = nn.GroupNorm(num_groups=groups, dtype=x.dtype, param_dtype=x.dtype).apply(
        {"params": {"scale": scale, "bias": bias}}, x + shift[:, None, None, :])
    return nn.swish(y) if swish else y
  return f


@pytest.mark.parametrize("shape,groups,swish,launch", [
    ((2, 4, 4, 16), 4, True, group_norm.Launch()),  # one loop iteration, a program a group (4 asked for)
    ((2, 4, 4, 16), 4, True, group_norm.Launch(programs=1)),  # one program an example
    ((2, 4, 4, 16), 4, True, group_norm.Launch(programs=2)),  # two programs an example, two groups each
    ((2, 6, 6, 8), 2, True, group_norm.Launch(chunk=32)),  # 36 pixels in rows of 4: nine iterations
    ((2, 6, 6, 8), 2, True, group_norm.Launch(chunk=32, accumulate="rows")),  # summed in every iteration
    ((2, 6, 6, 8), 2, True, group_norm.Launch(chunk=16, programs=8)),  # a program a group (8 asked for)
    ((3, 7, 4, 4), 4, False, group_norm.Launch(chunk=8)),  # the norm alone; 28 pixels in rows of 2, one
])                                                          # channel a group
def test_value_and_gradient_equal_flax_groupnorm_and_swish_in_float64(shape, groups, swish, launch):
  with jax.enable_x64(True):
    x, shift, scale, bias, dy = _inputs(shape)
    want, want_vjp = jax.vjp(_flax(groups, swish), x, shift, scale, bias)
    got, got_vjp = jax.vjp(lambda x, shift, scale, bias: group_norm.group_norm(
        x, scale, bias, groups, swish, shift=shift, launch=launch), x, shift, scale, bias)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    for g, w, name in zip(got_vjp(dy), want_vjp(dy), ("x", "shift", "scale", "bias")):
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-12, err_msg=name)
    no_shift = jnp.zeros_like(shift)
    np.testing.assert_allclose(group_norm.group_norm(x, scale, bias, groups, swish, launch=launch),
                               _flax(groups, swish)(x, no_shift, scale, bias), rtol=0, atol=1e-13)


@pytest.mark.parametrize("programs,accumulate", [(1, "elementwise"), (2, "rows")])
def test_dropout_in_the_kernel_is_the_mask_applied_to_flaxs_result_with_its_gradient(programs, accumulate):
  # 36 pixels in rows of 4: nine iterations.
  launch = group_norm.Launch(chunk=32 // programs, programs=programs, accumulate=accumulate)
  with jax.enable_x64(True):
    x, shift, scale, bias, dy = _inputs((2, 6, 6, 8))
    keep = jax.random.bernoulli(jax.random.key(7), 0.7, x.shape)
    want, want_vjp = jax.vjp(lambda *args: jnp.where(keep, _flax(2, True)(*args) / 0.7, 0.0), x, shift, scale, bias)
    got, got_vjp = jax.vjp(lambda x, shift, scale, bias: group_norm.group_norm(
        x, scale, bias, 2, True, shift=shift, keep=keep, keep_prob=0.7, launch=launch), x, shift, scale, bias)
    assert np.all((np.asarray(got) == 0) >= ~np.asarray(keep))  # dropped: exactly 0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    for g, w, name in zip(got_vjp(dy), want_vjp(dy), ("x", "shift", "scale", "bias")):
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-12, err_msg=name)
    with pytest.raises(ValueError, match=r"expected keep of the activations' shape \(2, 6, 6, 8\), got \(2, 6, 6, 4\)"):
      group_norm.group_norm(x, scale, bias, 2, keep=keep[..., :4], keep_prob=0.7)


@pytest.mark.parametrize("programs,accumulate", [(1, "elementwise"), (4, "rows")])
def test_parts_are_normalised_as_their_concatenation_without_forming_it(programs, accumulate):
  # Two parts of 8 channels (two groups of 4 each), a shift over both and dropout: the same value and
  # gradients as flax's norm of the concatenation, with a program for each part (asked for one) or for
  # each group. Parts that split a group, or whose groups are not a power of two in number, are refused.
  # Rows of 8 pixels: four iterations of a program's 8 channels (a part's), or of its 4 (a group's).
  launch = group_norm.Launch(chunk=64 if programs == 1 else 32, programs=programs, accumulate=accumulate)
  with jax.enable_x64(True):
    whole, shift, scale, bias, dy = _inputs((2, 4, 8, 16))
    parts = (whole[..., :8], whole[..., 8:])
    keep = jax.random.bernoulli(jax.random.key(7), 0.8, whole.shape)
    reference = lambda x1, x2, *args: jnp.where(  # noqa: E731
        keep, _flax(4, True)(jnp.concatenate([x1, x2], -1), *args) / 0.8, 0.0)
    want, want_vjp = jax.vjp(reference, *parts, shift, scale, bias)
    got, got_vjp = jax.vjp(lambda x1, x2, shift, scale, bias: group_norm.group_norm(
        (x1, x2), scale, bias, 4, shift=shift, keep=keep, keep_prob=0.8, launch=launch), *parts, shift, scale,
        bias)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    for g, w, name in zip(got_vjp(dy), want_vjp(dy), ("x1", "x2", "shift", "scale", "bias")):
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-12, err_msg=name)
  assert group_norm.supported([8, 8], 4) and group_norm.supported([128, 128], 32)
  assert not group_norm.supported([8, 16], 6)  # groups of 4, two and four a part, but six in all
  assert not group_norm.supported([4, 8], 3) and not group_norm.supported([12, 4], 4)  # 12 = 3 groups of 4
  with pytest.raises(ValueError, match=r"each part whole groups, .* got parts of \[12, 4\] channels in 4 groups"):
    group_norm.group_norm((jnp.zeros((1, 2, 2, 12)), jnp.zeros((1, 2, 2, 4))), jnp.ones(16), jnp.zeros(16), 4)


def test_programs_per_example_hold_whole_groups_of_one_part():
  x = jnp.zeros((2, 4, 4, 128))
  layout = lambda parts, programs: group_norm._layout(parts, 32, group_norm.Launch(programs=programs))  # noqa: E731
  assert layout((x,), 1)[1:] == (32, ((0, 32),), 16) and layout((x,), 1).programs == 1
  assert layout((x,), 4).block == 8 and layout((x,), 4).owners == ((0, 4),)
  assert layout((x,), 64).block == 1 and layout((x,), 64).programs == 32  # at most a program a group
  up = layout((x[..., :64], x[..., 64:]), 1)  # an up block's input and skip: a program each at least
  assert up.programs == 2 and up.owners == ((0, 1), (1, 2)) and up.rows == 16
  three = layout((x[..., :32], x[..., 32:64], x[..., 64:]), 1)  # 8, 8 and 16 groups: blocks of 8
  assert three.block == 8 and three.owners == ((0, 1), (1, 2), (2, 4))
  assert group_norm.launch("xla") is None and group_norm.launch("pallas") == group_norm.Launch()
  assert group_norm.launch(group_norm.Launch(16, 4)).elements == 16 * 1024
  with pytest.raises(ValueError, match=r"group_norm: expected one of \('xla', 'pallas'\) or a vdm.group_norm.Launch"):
    group_norm.launch("triton")
  with pytest.raises(ValueError, match="Launch: expected programs a power of two ≥ 1, got 3"):
    group_norm.Launch(programs=3)
  with pytest.raises(ValueError, match="Launch: expected num_warps ≤ 32, got 64"):
    group_norm.Launch(num_warps=64)
  with pytest.raises(ValueError, match=r"Launch: expected accumulate one of \('elementwise', 'rows'\), got 'tree'"):
    group_norm.Launch(accumulate="tree")


def test_rows_per_iteration_are_the_largest_power_of_two_that_divides_the_pixels():
  assert group_norm._rows(1024, 128) == 64  # 8,192 elements an iteration
  assert group_norm._rows(784, 64) == 16    # 784 = 16 · 49
  assert group_norm._rows(49, 8) == 1
  assert group_norm._rows(4, 8192) == 1


def test_bfloat16_activations_give_flaxs_float32_result_to_bfloat16_rounding():
  x, shift, scale, bias, _ = _inputs((2, 8, 8, 32), jnp.float32)
  x, shift = x.astype(jnp.bfloat16), shift.astype(jnp.bfloat16)
  want = _flax(8, True)(x.astype(jnp.float32), shift.astype(jnp.float32), scale, bias)
  got = group_norm.group_norm(x, scale, bias, 8, True, 1e-6, jnp.bfloat16, shift=shift)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=2 ** -8, atol=2 ** -8)


def test_supported_shapes_and_the_error_for_others():
  assert group_norm.supported(128, 32) and group_norm.supported(256, 16) and group_norm.supported(64, 16)
  assert not group_norm.supported(96, 8)  # 12 a group
  assert not group_norm.supported(48, 3)  # 3 groups
  x = jnp.zeros((1, 2, 2, 12))
  with pytest.raises(ValueError, match="execution.group_norm='pallas': .* got 12 channels in 1 groups"):
    group_norm.group_norm(x, jnp.ones(12), jnp.zeros(12), 1)


def _network(kernel, **overrides):
  config = cifar10.get_config()
  config.model.network.update(dict(dict(num_blocks=1, channels=16, channel_mult=(1, 2), dropout=0.0), **overrides))
  config.execution.update(skip_concat="after_norm", group_norm=kernel)
  return config_lib.build_model(config).network


def test_the_network_with_the_kernel_is_the_same_function_of_the_same_parameters():
  # Every norm through the kernel: 4 groups of 4 channels at 16, the up path's input and skip apart, the
  # attention's norm without swish.
  # With dropout in training, applied inside the kernel: the same masks (packed keys, as the CIFAR-10
  # configs draw them).
  z = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  gamma = jnp.array([-3.0, 1.0])
  xla, pallas = _network("xla", dropout=0.3), _network("pallas", dropout=0.3)
  params = xla.init(jax.random.key(1), z, gamma)
  assert jax.tree.structure(params) == jax.tree.structure(pallas.init(jax.random.key(1), z, gamma))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
  rngs = {"dropout": dropout.packed_key(jax.random.key(3))}
  loss = lambda net: lambda p: jnp.sum(net.apply(p, z, gamma, train=True, rngs=rngs) ** 2)  # noqa: E731
  deterministic = [jax.jit(net.apply)(params, z, gamma) for net in (xla, pallas)]
  np.testing.assert_allclose(deterministic[1], deterministic[0], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(xla.apply(params, z, gamma, train=True, rngs=rngs) - deterministic[0])).max() > 1e-3
  (want, want_grad), (got, got_grad) = (jax.jit(jax.value_and_grad(loss(n)))(params) for n in (xla, pallas))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])  # noqa: E731
  assert np.linalg.norm(flat(got_grad) - flat(want_grad)) < 1e-5 * np.linalg.norm(flat(want_grad))
  text = jax.make_jaxpr(loss(pallas))(params).pretty_print()
  # Each scanned stack traced once: down 2 + 2, middle 3 + 2 (the attention's), up 2 + 2 (input and skip in
  # one kernel), norm_out 1 = 14 norms, each with a Triton and an interpreter branch.
  assert text.count("pallas_call") == 2 * 14


def test_norms_the_kernel_cannot_take_stay_xlas():
  # 12 channels: one group of 12 (not a power of two), so no norm is the kernel's; the parameters are the same.
  z, gamma = jnp.zeros((1, 4, 4, 3)), jnp.zeros(1)
  nets = [_network(kernel, channels=12, channel_mult=(1, 1)) for kernel in ("xla", "pallas")]
  params = nets[0].init(jax.random.key(1), z, gamma)
  jaxprs = [jax.make_jaxpr(net.apply)(params, z, gamma).pretty_print() for net in nets]
  assert "pallas_call" not in jaxprs[1] and jaxprs[0] == jaxprs[1]


def test_config_refuses_an_unknown_kernel_and_the_kernel_on_tpus(monkeypatch):
  config = cifar10.get_config()
  config.execution.group_norm = "triton"
  with pytest.raises(config_lib.ConfigError,
                     match=r"execution.group_norm: expected one of \('xla', 'pallas', 'auto'\)"):
    config_lib.validate(config)
  config.execution.group_norm = "pallas"
  config_lib.validate(config)
  for field, value, expected in (("pallas_num_warps", 6, "1, 2, 4, 8, 16 or 32"),
                                 ("pallas_programs", 3, "a power of two ≥ 1"),
                                 ("pallas_accumulate", "tree", r"one of \('elementwise', 'rows'\)")):
    bad = cifar10.get_config()
    bad.execution.update(group_norm="pallas", **{field: value})
    with pytest.raises(config_lib.ConfigError, match=f"execution.{field}: expected {expected}, got {value!r}"):
      config_lib.validate(bad)
  config.execution.update(pallas_num_warps=16, pallas_programs=4, pallas_accumulate="rows")
  assert config_lib.build_model(config).network.group_norm == group_norm.Launch(
      num_warps=16, programs=4, accumulate="rows")
  # The kernels have a backward pass, not a forward mode: a network for jax.jvp (the ODE likelihood) has XLA's.
  assert config_lib.build_model(config, for_eval=True, forward_mode=True).network.group_norm == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(config_lib.ConfigError, match="execution.group_norm: expected 'xla' on TPUs"):
    config_lib.validate(config)


def test_the_on_device_check_passes_the_kernels_and_fails_a_wrong_one(monkeypatch):
  # max_error is what "auto" runs on a GPU before it uses the kernels; here they run in the interpreter.
  assert group_norm.max_error(group_norm.Launch()) < 1e-5
  wrong_bias = group_norm._reference
  monkeypatch.setattr(group_norm, "_reference", lambda parts, scale, bias, *rest: wrong_bias(
      parts, scale, bias + 1e-2, *rest))
  assert group_norm.max_error(group_norm.Launch(programs=2)) > 1e-3


def assert_inside(text: str, part: str) -> None:
  assert part in text, text


def test_auto_uses_the_kernels_only_on_one_gpu_where_they_pass_the_check(monkeypatch, caplog):
  config = cifar10.get_config()
  config.execution.group_norm = "auto"
  config_lib.validate(config)
  launch = group_norm.Launch(num_warps=config.execution.pallas_num_warps,
                             programs=config.execution.pallas_programs,
                             accumulate=config.execution.pallas_accumulate)
  # Here (a CPU): XLA's norm, without running the check and without a warning.
  monkeypatch.setattr(group_norm, "max_error", lambda *a, **k: pytest.fail("the check ran off a GPU"))
  assert group_norm.unavailable() == "the default backend is 'cpu', not a GPU"
  assert config_lib.group_norm_launch(config) == "xla" and not caplog.records
  # On one GPU: the kernels if they pass, else XLA's with a warning that says why.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  group_norm._checked.cache_clear()
  monkeypatch.setattr(group_norm, "max_error", lambda launch: 3e-7)
  assert config_lib.group_norm_launch(config) == launch
  for error, why in ((lambda launch: 0.02, "differ from the reference on .* by 0.02"),
                     (lambda launch: 1 / 0, "failed on .*: ZeroDivisionError"),
                     (lambda launch: float("nan"), "by nan")):
    group_norm._checked.cache_clear()
    monkeypatch.setattr(group_norm, "max_error", error)
    caplog.clear()
    assert config_lib.group_norm_launch(config) == "xla"
    assert re.search(f"execution.group_norm='auto': XLA's GroupNorm, not the Pallas kernels: .*{why}",
                     caplog.text)
  jax.jit(lambda x: assert_inside(group_norm.unavailable(), "inside a traced function"))(0)
  # Several GPUs: the kernels too, each device on its share of the batch (tests/test_parallel.py).
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  group_norm._checked.cache_clear()
  monkeypatch.setattr(group_norm, "max_error", lambda launch: 3e-7)
  assert group_norm.unavailable() is None and config_lib.group_norm_launch(config) == launch
  group_norm._checked.cache_clear()


def test_skip_projection_auto_is_convolutions_on_gpus_only(monkeypatch):
  config = cifar10.get_config()
  assert config.execution.skip_projection == "auto"
  assert config_lib.build_model(config).network.skip_projection == "dense"  # on this CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert config_lib.resolve_skip_projection("auto") == "conv" and config_lib.resolve_skip_projection("dense") == "dense"
  config.execution.skip_projection = "matmul"
  with pytest.raises(config_lib.ConfigError, match=r"execution.skip_projection: expected one of \('dense', 'conv', "
                                                   r"'auto'\), got 'matmul'"):
    config_lib.validate(config)


@pytest.mark.parametrize("accelerator", ["gpu", "tpu"])
def test_scan_unroll_zero_unrolls_every_stack_on_accelerators_only(monkeypatch, accelerator):
  config = cifar10.get_config()
  config.execution.scan_unroll = 0
  config_lib.validate(config)
  assert config_lib.resolve_scan_unroll(config) == 1  # on this CPU
  assert config_lib.build_model(config).network.scan_unroll == 1
  monkeypatch.setattr(jax, "default_backend", lambda: accelerator)
  assert config_lib.resolve_scan_unroll(config) == config.model.network.num_blocks + 1  # the up stacks' length
  config.execution.scan_unroll = 2
  assert config_lib.resolve_scan_unroll(config) == 2

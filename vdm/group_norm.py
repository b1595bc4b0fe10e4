"""GroupNorm and swish as one GPU kernel each way: ``execution.group_norm="pallas"``.

Where the paper's CIFAR-10 step spends its time on an H200 outside the
convolutions (README, Performance): GroupNorm's statistics and their
gradients, ~1,800 small reduction kernels a step, as XLA splits each
reduction in two and differentiates the norm into several more. Here one
program per example reads its ``[H·W, C]`` activations once to sum them
per group, then again (from L2: 256 KB an example at 32×32×128 bf16) to
write ``swish((x + c − μ) / σ · scale + bias)``, ``c`` the example's
conditioning (a ResNet block adds it just before its second norm), added
here rather than in a pass of its own, and the block's dropout mask
applied to the result, rather than by a pass that reads and writes it
again. The input may come in parts whose concatenation is meant (an up
block's input and skip): each part is read where it lies and the
concatenated result written, so the concatenation is never formed, nor
its gradient split. The backward pass likewise takes one kernel: sums of
the incoming gradient per channel, then ``∂/∂x`` (per part) and ``∂/∂c``.
``scale`` and ``bias`` get per-example sums the caller adds up. Compiled
for an H200, the paper's CIFAR-10 step launches 0.72× the kernels and
moves 0.84× the bytes of XLA's norms (README, Performance); not yet timed
on a GPU.

Written in Pallas for Triton (GPUs). Elsewhere the same kernels run in
Pallas's interpreter (``interpret=True``: correct and slow; the tests use
it). The function is that of ``dropout(swish(nn.GroupNorm(...)(x)))``
(float32 statistics, E[x²] − E[x]² as flax computes the variance, its ε),
tested against it in float64 with its gradient; the result is rounded to
``dtype`` once, after the dropout.

Triton's arrays have power-of-two sizes: groups and channels per group
must be powers of two, and each part a power of two of whole groups
(:func:`supported`; 128 channels in 32 groups is the paper's network, an
up block's 128 + 128 in 32 groups of 8 too). The loop runs over rows of
``rows`` pixels, a power of two that divides H·W.
"""

import functools
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

KERNELS = ("xla", "pallas")  # execution.group_norm
_CHUNK = 8192  # elements per loop iteration of a program: 32 a thread at 8 warps, 16 KB of bf16 in flight


def _power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def supported(channels: Union[int, Sequence[int]], groups: int) -> bool:
  """Whether the kernel takes ``channels`` (or parts of these widths, concatenated) in ``groups``: the group
  count and size powers of two, and for parts, each a power-of-two number of whole groups."""
  widths = (channels,) if isinstance(channels, int) else tuple(channels)
  total = sum(widths)
  if total % groups or not (_power_of_two(groups) and _power_of_two(total // groups)):
    return False
  return all(w % (total // groups) == 0 and _power_of_two(w // (total // groups)) for w in widths)


def _rows(pixels: int, channels: int) -> int:
  """Pixels per loop iteration: the largest power of two ≤ _CHUNK / channels that divides ``pixels``."""
  rows = 1
  while rows * 2 * channels <= _CHUNK and pixels % (rows * 2) == 0:
    rows *= 2
  return rows


def _chunk(ref, i: jax.Array, rows: int, dtype, groups: slice = slice(None)) -> jax.Array:
  """Rows ``i·rows`` to ``(i + 1)·rows`` of an example's ``[P, G, S]`` block, its ``groups``, in ``dtype``."""
  return ref[pl.ds(pl.multiple_of(i * rows, rows), rows), groups, :].astype(dtype)


def _swish_and_grad(u: jax.Array) -> tuple[jax.Array, jax.Array]:
  """swish(u) = u·σ(u) and its derivative σ(u)(1 + u(1 − σ(u)))."""
  s = 1.0 / (1.0 + jnp.exp(-u))
  return u * s, s * (1.0 + u * (1.0 - s))


def _dropout(value: jax.Array, keep_ref, i: jax.Array, rows: int, groups: slice,
             keep_prob: Optional[float]) -> jax.Array:
  """``value`` (rows ``i·rows`` … of an example, its ``groups``) where the example's mask keeps it, divided
  by ``keep_prob``, else 0; untouched without a mask (``keep_prob`` None)."""
  if keep_prob is None:
    return value
  return jnp.where(_chunk(keep_ref, i, rows, jnp.int32, groups) != 0, value / keep_prob, 0.0)


def _split(refs, parts: int, shifted: bool, keep_prob: Optional[float]):
  """A kernel's refs: the parts' activations, scale and bias, the shift and the mask where there are
  (else None), the rest."""
  refs = list(refs)
  xs, (scale, bias), refs = refs[:parts], refs[parts:parts + 2], refs[parts + 2:]
  shift = refs.pop(0) if shifted else None
  keep = refs.pop(0) if keep_prob is not None else None
  return xs, scale, bias, shift, keep, refs


def _shift(shift_ref, groups: slice, dtype):
  """The example's shift of ``groups``, ``[1, G_j, S]`` to add to a chunk; 0 without one."""
  return 0.0 if shift_ref is None else shift_ref[groups, :].astype(dtype)[None]


def _forward_kernel(*refs, parts, rows, epsilon, swish, shifted, keep_prob):
  # Refs: each part's x [P, G_j, S] (its groups start at parts[j][0] of the G in all), then scale, bias
  # and (if shifted) the example's shift: [G, S]; with dropout (keep_prob not None) the example's mask as
  # int8 [P, G, S]; out: y [P, G, S], mean and rstd [G]. Arithmetic in scale's dtype (float32).
  x_refs, scale_ref, bias_ref, shift_ref, keep_ref, (y_ref, mean_ref, rstd_ref) = _split(
      refs, len(parts), shifted, keep_prob)
  dtype = scale_ref.dtype
  for x_ref, (first, count), step in zip(x_refs, parts, rows):
    groups = slice(first, first + count)
    shift = _shift(shift_ref, groups, dtype)

    def accumulate(i, sums, x_ref=x_ref, step=step, shift=shift):
      x = _chunk(x_ref, i, step, dtype) + shift
      return sums[0] + jnp.sum(x, axis=0), sums[1] + jnp.sum(x * x, axis=0)

    steps = x_ref.shape[0] // step
    zeros = jnp.zeros((count, x_ref.shape[2]), dtype)
    s1, s2 = lax.fori_loop(0, steps, accumulate, (zeros, zeros))
    n = x_ref.shape[0] * x_ref.shape[2]
    mean = jnp.sum(s1, axis=1) / n  # [G_j]
    var = jnp.maximum(jnp.sum(s2, axis=1) / n - mean * mean, 0.0)  # as flax: E[x²] − E[x]², clipped at 0
    rstd = lax.rsqrt(var + epsilon)
    mul = scale_ref[groups, :] * rstd[:, None]  # [G_j, S]
    bias = bias_ref[groups, :]

    def write(i, carry, x_ref=x_ref, step=step, shift=shift, mean=mean, mul=mul, bias=bias, groups=groups):
      u = (_chunk(x_ref, i, step, dtype) + shift - mean[None, :, None]) * mul[None] + bias[None]
      y = _dropout(_swish_and_grad(u)[0] if swish else u, keep_ref, i, step, groups, keep_prob)
      y_ref[pl.ds(pl.multiple_of(i * step, step), step), groups, :] = y.astype(y_ref.dtype)
      return carry

    lax.fori_loop(0, steps, write, 0)
    mean_ref[groups] = mean
    rstd_ref[groups] = rstd


def _backward_kernel(*refs, parts, rows, swish, shifted, keep_prob):
  # With x̂ = (x + shift − μ)·r, u = x̂·scale + bias, y = swish(u): du = dy·swish'(u), ∂bias = Σ du,
  # ∂scale = Σ du·x̂, ∂x = r·(du·scale − mean_g(du·scale) − x̂·mean_g(du·scale·x̂)) (means over the n values
  # of a group) and ∂shift = Σ ∂x over the pixels. With dropout, dy is first masked and divided as y was.
  # Refs: the forward kernel's inputs, mean and rstd, dy [P, G, S]; out: each part's ∂x [P, G_j, S], then
  # (if shifted) ∂shift, and ∂scale, ∂bias [G, S] (the example's).
  x_refs, scale_ref, bias_ref, shift_ref, keep_ref, refs = _split(refs, len(parts), shifted, keep_prob)
  (mean_ref, rstd_ref, dy_ref), refs = refs[:3], refs[3:]
  dx_refs, refs = refs[:len(parts)], refs[len(parts):]
  dshift_ref, (dscale_ref, dbias_ref) = (refs[0], refs[1:]) if shifted else (None, refs)
  dtype = scale_ref.dtype
  for x_ref, dx_ref, (first, count), step in zip(x_refs, dx_refs, parts, rows):
    groups = slice(first, first + count)
    mean = mean_ref[groups][None, :, None]  # [1, G_j, 1]
    rstd = rstd_ref[groups][None, :, None]
    scale, bias = scale_ref[groups, :], bias_ref[groups, :]  # [G_j, S]
    shift = _shift(shift_ref, groups, dtype)

    def grads(i, x_ref=x_ref, step=step, groups=groups, mean=mean, rstd=rstd, scale=scale, bias=bias,
              shift=shift):
      x_hat = (_chunk(x_ref, i, step, dtype) + shift - mean) * rstd
      dy = _dropout(_chunk(dy_ref, i, step, dtype, groups), keep_ref, i, step, groups, keep_prob)
      du = dy * _swish_and_grad(x_hat * scale[None] + bias[None])[1] if swish else dy
      return x_hat, du

    def accumulate(i, sums, grads=grads):
      x_hat, du = grads(i)
      return sums[0] + jnp.sum(du, axis=0), sums[1] + jnp.sum(du * x_hat, axis=0)

    steps = x_ref.shape[0] // step
    zeros = jnp.zeros(scale.shape, dtype)
    dbias, dscale = lax.fori_loop(0, steps, accumulate, (zeros, zeros))
    n = x_ref.shape[0] * x_ref.shape[2]
    mean_d = (jnp.sum(dbias * scale, axis=1) / n)[None, :, None]  # mean_g(du·scale)
    mean_dx = (jnp.sum(dscale * scale, axis=1) / n)[None, :, None]  # mean_g(du·scale·x̂)

    def write(i, dshift, grads=grads, dx_ref=dx_ref, step=step, rstd=rstd, scale=scale, mean_d=mean_d,
              mean_dx=mean_dx):
      x_hat, du = grads(i)
      dx = rstd * (du * scale[None] - mean_d - x_hat * mean_dx)
      dx_ref[pl.ds(pl.multiple_of(i * step, step), step), :, :] = dx.astype(dx_ref.dtype)
      return dshift + jnp.sum(dx, axis=0) if shifted else dshift

    dshift = lax.fori_loop(0, steps, write, zeros)
    if shifted:
      dshift_ref[groups, :] = dshift.astype(dshift_ref.dtype)
    dscale_ref[groups, :] = dscale
    dbias_ref[groups, :] = dbias


def _call(kernel, ins, outs, interpret: bool):
  """One program per example. ``ins`` and ``outs`` are (array or ShapeDtypeStruct, kind) pairs: kind
  "param" (``[G, S]``, whole to every program) or "example" (``[B, …]``: each program gets its example's).

  Triton where the program is lowered for a GPU; Pallas's interpreter on other platforms or if ``interpret``.
  """
  def spec(shape, kind):
    if kind == "param":
      return pl.BlockSpec(shape, lambda b: (0,) * len(shape))
    return pl.BlockSpec((None,) + shape[1:], lambda b: (b,) + (0,) * (len(shape) - 1))

  batch = outs[0][0].shape[0]
  outs, out_specs = tuple(o for o, _ in outs), [spec(o.shape, kind) for o, kind in outs]
  ins, in_specs = [x for x, _ in ins], [spec(x.shape, kind) for x, kind in ins]
  call = functools.partial(pl.pallas_call, kernel, out_shape=outs, grid=(batch,), in_specs=in_specs,
                           out_specs=out_specs)
  interpreted = lambda *args: call(interpret=True)(*args)  # noqa: E731
  if interpret:
    return interpreted(*ins)
  triton = lambda *args: call(compiler_params=pallas_triton.CompilerParams(num_warps=8))(*args)  # noqa: E731
  return lax.platform_dependent(*ins, cuda=triton, rocm=triton, default=interpreted)


def group_norm(x: Union[jax.Array, Sequence[jax.Array]], scale: jax.Array, bias: jax.Array, groups: int,
               swish: bool = True, epsilon: float = 1e-6, dtype: Any = None, *, shift: Optional[jax.Array] = None,
               keep: Optional[jax.Array] = None, keep_prob: float = 1.0, interpret: bool = False) -> jax.Array:
  """``swish(GroupNorm(x + shift))`` (or the norm alone, ``swish=False``), then dropout, as one kernel.

  Args:
    x: ``[B, H, W, C]`` activations, any float dtype; or several parts
      ``[B, H, W, C_i]`` whose concatenation (channels last) is meant:
      it is never formed, the kernels read each part and write the
      concatenated result (:func:`supported` says which parts it takes:
      none may split a group).
    scale, bias: ``[C]`` float32 (float64 for a float64 reference): the
      statistics and arithmetic are in their dtype.
    groups: norm groups; :func:`supported` must hold.
    dtype: the result's dtype (default ``x``'s).
    shift: ``[B, C]`` added to each example's pixels first (a block's
      conditioning), in the kernel; None: 0.
    keep, keep_prob: dropout applied to the result in the kernel: where
      ``keep`` (``[B, H, W, C]`` bool, e.g. :meth:`vdm.dropout.Dropout.mask`)
      the result divided by ``keep_prob`` (in float32), elsewhere 0; the
      backward kernel masks the incoming gradient alike. None: no dropout.
    interpret: run the kernels in Pallas's interpreter on every platform
      (without it: Triton on GPUs, the interpreter elsewhere).

  Returns: ``[B, H, W, C]`` in ``dtype``.
  """
  parts = tuple(x) if isinstance(x, (list, tuple)) else (x,)
  b, h, w, _ = parts[0].shape
  c = sum(part.shape[-1] for part in parts)
  if keep is not None and keep.shape != (b, h, w, c):
    raise ValueError(f"group_norm: expected keep of the activations' shape {(b, h, w, c)}, got {keep.shape}")
  keep, keep_prob = (None, None) if keep is None else (keep.astype(jnp.int8), float(keep_prob))
  return _group_norm(parts, shift, scale, bias, keep, groups, swish, epsilon, dtype, keep_prob, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _group_norm(parts, shift, scale, bias, keep, groups, swish, epsilon, dtype, keep_prob, interpret):
  return _forward(parts, shift, scale, bias, keep, groups, swish, epsilon, dtype, keep_prob, interpret)[0]


def _layout(parts: tuple, groups: int) -> tuple[tuple[int, int, int, int], tuple, tuple]:
  """The parts as the kernels see them: the whole's ``[B, P, G, S]`` (P = H·W pixels, S = C / G), each
  part's (first group, group count) and its rows per loop iteration."""
  widths = [part.shape[-1] for part in parts]
  if not supported(widths, groups):
    what = f"{sum(widths)} channels" if len(widths) == 1 else f"parts of {widths} channels"
    raise ValueError(f"execution.group_norm='pallas': expected groups and channels per group powers of two"
                     f"{'' if len(widths) == 1 else ', each part whole groups, a power of two of them'}, "
                     f"got {what} in {groups} groups")
  b, h, w, _ = parts[0].shape
  size = sum(widths) // groups
  firsts = [sum(widths[:j]) // size for j in range(len(widths))]
  return ((b, h * w, groups, size), tuple((first, c // size) for first, c in zip(firsts, widths)),
          tuple(_rows(h * w, c) for c in widths))


def _view(parts: tuple, shape: tuple, spans: tuple) -> tuple:
  """Each part as ``[B, P, G_j, S]`` of the kernels."""
  b, pixels, _, s = shape
  return tuple((part.reshape(b, pixels, count, s), "example") for part, (_, count) in zip(parts, spans))


def _forward(parts, shift, scale, bias, keep, groups, swish, epsilon, dtype, keep_prob, interpret):
  shape, spans, rows = _layout(parts, groups)
  b, _, g, s = shape
  kernel = functools.partial(_forward_kernel, parts=spans, rows=rows, epsilon=epsilon, swish=swish,
                             shifted=shift is not None, keep_prob=keep_prob)
  stat = jax.ShapeDtypeStruct((b, g), scale.dtype)
  outs = ((jax.ShapeDtypeStruct(shape, dtype or parts[0].dtype), "example"), (stat, "example"),
          (stat, "example"))
  y, mean, rstd = _call(kernel, _inputs(parts, scale, bias, shift, keep, shape, spans), outs, interpret)
  out_shape = parts[0].shape[:-1] + (g * s,)
  return y.reshape(out_shape), (parts, shift, scale, bias, keep, mean, rstd)


def _inputs(parts, scale, bias, shift, keep, shape, spans) -> tuple:
  """Both kernels' first inputs: the parts, scale and bias, the shift and the mask where there are."""
  b, _, g, s = shape
  return (_view(parts, shape, spans) + ((scale.reshape(g, s), "param"), (bias.reshape(g, s), "param"))
          + (() if shift is None else ((shift.reshape(b, g, s), "example"),))
          + (() if keep is None else ((keep.reshape(shape), "example"),)))


def _backward(groups, swish, epsilon, dtype, keep_prob, interpret, residuals, dy):
  parts, shift, scale, bias, keep, mean, rstd = residuals
  shape, spans, rows = _layout(parts, groups)
  b, pixels, g, s = shape
  kernel = functools.partial(_backward_kernel, parts=spans, rows=rows, swish=swish, shifted=shift is not None,
                             keep_prob=keep_prob)
  out_dtypes = (scale.dtype,) * 2 if shift is None else (shift.dtype, scale.dtype, scale.dtype)
  outs = tuple((jax.ShapeDtypeStruct((b, pixels, count, s), part.dtype), "example")
               for part, (_, count) in zip(parts, spans)) + tuple(
      (jax.ShapeDtypeStruct((b, g, s), out_dtype), "example") for out_dtype in out_dtypes)
  ins = _inputs(parts, scale, bias, shift, keep, shape, spans) + (
      (mean, "example"), (rstd, "example"), (dy.reshape(shape), "example"))
  *dxs, dscale, dbias = _call(kernel, ins, outs, interpret)
  dshift = None if shift is None else dxs.pop().reshape(shift.shape)
  return (tuple(dx.reshape(part.shape) for dx, part in zip(dxs, parts)), dshift,
          dscale.sum(0).reshape(scale.shape), dbias.sum(0).reshape(bias.shape), None)


_group_norm.defvjp(_forward, _backward)


class GroupNormSwish(nn.Module):
  """``swish(nn.GroupNorm(num_groups)(x))`` (``swish=False``: the norm alone) by :func:`group_norm`.

  The parameters are ``nn.GroupNorm``'s (``scale``, ``bias``: ``[C]``
  float32), so checkpoints move between the two. Off GPUs the kernels run
  in Pallas's interpreter (for tests; slow).
  """
  num_groups: int
  dtype: Any = jnp.float32
  swish: bool = True
  epsilon: float = 1e-6  # nn.GroupNorm's

  @nn.compact
  def __call__(self, x: jax.Array, shift: Optional[jax.Array] = None,
               dropout: Optional[tuple[jax.Array, float]] = None) -> jax.Array:
    """x ``[B, H, W, C]``; shift ``[B, C]`` added to x first, in the kernel (None: 0); dropout: a mask of
    x's shape and its keep probability (:meth:`vdm.dropout.Dropout.mask`), applied in the kernel."""
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    keep, keep_prob = dropout if dropout is not None else (None, 1.0)
    return group_norm(x, scale, bias, self.num_groups, self.swish, self.epsilon, self.dtype, shift=shift,
                      keep=keep, keep_prob=keep_prob)

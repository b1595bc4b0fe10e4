"""A 2-D convolution whose backward pass is written out as convolutions and matmuls.

XLA:CPU runs the convolutions it derives for a gradient 5–30× slower inside
a loop (jax-ml/jax#12868); the scanned network's blocks are such a loop.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_dot_grad(x, kernel, padding, precision):
  return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC, precision=precision)


def _conv_dot_grad_fwd(x, kernel, padding, precision):
  return _conv_dot_grad(x, kernel, padding, precision), (x, kernel)


def _conv_dot_grad_bwd(padding, precision, residuals, g):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  (top, bottom), (left, right) = padding
  # Input gradient: the convolution of g with the flipped, transposed kernel.
  flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
  dx = lax.conv_general_dilated(g, flipped, (1, 1), ((kh - 1 - top, kh - 1 - bottom),
                                                     (kw - 1 - left, kw - 1 - right)),
                                dimension_numbers=_NHWC, precision=precision)
  # Kernel gradient: one [C_in, B·H·W] × [B·H·W, C_out] matmul per tap.
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  height, width = g.shape[1:3]
  g_flat = g.reshape(-1, g.shape[-1])
  accumulate = jnp.promote_types(x.dtype, jnp.float32)  # bfloat16 inputs sum in float32
  taps = [[lax.dot_general(xp[:, i:i + height, j:j + width, :].reshape(-1, x.shape[-1]), g_flat,
                           (((0,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=accumulate)
           for j in range(kw)] for i in range(kh)]
  dkernel = jnp.stack([jnp.stack(row) for row in taps])
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_conv_dot_grad.defvjp(_conv_dot_grad_fwd, _conv_dot_grad_bwd)


def conv_dot_grad(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                  dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """``lax.conv_general_dilated`` whose backward pass is written out.

  The forward pass is the same convolution. The backward pass computes the
  input gradient as a plain NHWC convolution and the kernel gradient as one
  matmul per kernel tap. XLA:CPU runs the convolutions it derives for the
  gradient 5–30× slower inside a loop (jax-ml/jax#12868), so without this
  the scanned network trains far slower than the unrolled one on CPU.
  Only stride 1, no dilation, one group, NHWC/HWIO; anything else goes to
  ``lax.conv_general_dilated`` unchanged.
  """
  canonical = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  plain = (lhs.ndim == 4 and tuple(window_strides) == (1, 1) and not kwargs
           and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
           and feature_group_count == 1
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == canonical)
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision, **kwargs)
  if precision is None:  # the backward pass is traced outside any precision context: fix it now
    precision = jax.config.jax_default_matmul_precision
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  return _conv_dot_grad(lhs, rhs, padding, precision)

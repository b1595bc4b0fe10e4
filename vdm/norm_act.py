"""GroupNorm, swish and dropout as one function with a hand-written gradient.

``swish(GroupNorm(x))``, optionally followed by dropout, is most of a
ResNet block's memory-bound work. Differentiated by JAX, its backward pass
becomes many small reductions (about 27 per block on a GPU, README,
Performance). Written out, it needs two: per example and channel, the sums
over height and width of

    d = ∂L/∂pre   and   d · x̂,       pre = scale · x̂ + bias,  x̂ = (x − μ_g) · r_g,

from which every other sum follows by summing channels within a group:

    ∂L/∂bias  = Σ_b Σ_hw d           ∂L/∂scale = Σ_b Σ_hw d · x̂
    ∂L/∂x     = r_g · (scale · d − mean_g(scale · d) − x̂ · mean_g(scale · d · x̂))

with r_g = 1/√(var_g + ε) (the ε included: this is the exact gradient of
the function computed, not an approximation).

The statistics are float32 whatever ``x``'s dtype (as ``flax.linen.GroupNorm``
computes them), and so is everything up to the output, which is cast back to
``x.dtype``. The mean and 1/std of each group are tagged ``"norm_stats"``
(:func:`jax.ad_checkpoint.checkpoint_name`), so a remat policy can keep them
and the recomputed forward pass need not reduce again.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def _compute_dtype(x: jax.Array):
  """float32, or x's own dtype if wider (float64 tests)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _stats(x: jax.Array, num_groups: int, epsilon: float):
  """Per example and group: mean and 1/√(var + ε) ``[B, G]``, float32, from one pass over ``x``."""
  b, c = x.shape[0], x.shape[-1]
  xf = x.astype(_compute_dtype(x))
  axes = tuple(range(1, x.ndim - 1))
  n = x.size // (b * c) * (c // num_groups)
  s1 = xf.sum(axes).reshape(b, num_groups, -1).sum(-1)
  s2 = jnp.square(xf).sum(axes).reshape(b, num_groups, -1).sum(-1)
  mean = s1 / n
  var = jnp.maximum(s2 / n - jnp.square(mean), 0.0)  # flax's fast variance
  return mean, jax.lax.rsqrt(var + epsilon)


def _per_channel(v: jax.Array, channels: int, ndim: int) -> jax.Array:
  """``[B, G]`` → ``[B, 1, …, 1, C]``: each group's value on its channels."""
  b, g = v.shape
  v = jnp.repeat(v, channels // g, axis=1)
  return v.reshape((b,) + (1,) * (ndim - 2) + (channels,))


def _pre(x, scale, bias, mean, rstd):
  """The normalised, scaled and shifted input (float32) and x̂."""
  c = x.shape[-1]
  xhat = (x.astype(_compute_dtype(x)) - _per_channel(mean, c, x.ndim)) * _per_channel(rstd, c, x.ndim)
  return xhat * scale + bias, xhat


def _forward(x, scale, bias, keep, num_groups, epsilon, keep_prob):
  mean, rstd = _stats(x, num_groups, epsilon)
  mean, rstd = checkpoint_name(mean, "norm_stats"), checkpoint_name(rstd, "norm_stats")
  pre, _ = _pre(x, scale, bias, mean, rstd)
  y = pre * jax.nn.sigmoid(pre)
  if keep is not None:
    y = jnp.where(keep, y / keep_prob, 0.0)
  return y.astype(x.dtype), (x, scale, bias, keep, mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _group_norm_swish(x, scale, bias, keep, num_groups, epsilon, keep_prob):
  return _forward(x, scale, bias, keep, num_groups, epsilon, keep_prob)[0]


def _fwd(x, scale, bias, keep, num_groups, epsilon, keep_prob):
  return _forward(x, scale, bias, keep, num_groups, epsilon, keep_prob)


def _bwd(num_groups, epsilon, keep_prob, residuals, g):
  del epsilon  # in rstd already
  x, scale, bias, keep, mean, rstd = residuals
  b, c = x.shape[0], x.shape[-1]
  g = g.astype(_compute_dtype(x))
  if keep is not None:
    g = jnp.where(keep, g / keep_prob, 0.0)
  pre, xhat = _pre(x, scale, bias, mean, rstd)
  sig = jax.nn.sigmoid(pre)
  d = g * sig * (1.0 + pre * (1.0 - sig))  # ∂L/∂pre
  axes = tuple(range(1, x.ndim - 1))
  s1, s2 = d.sum(axes), (d * xhat).sum(axes)  # [B, C]: the only two passes over the activations
  n = x.size // (b * c) * (c // num_groups)
  m1 = (scale * s1).reshape(b, num_groups, -1).sum(-1) / n  # mean_g(scale · d)
  m2 = (scale * s2).reshape(b, num_groups, -1).sum(-1) / n  # mean_g(scale · d · x̂)
  dx = _per_channel(rstd, c, x.ndim) * (d * scale - _per_channel(m1, c, x.ndim) - xhat * _per_channel(m2, c, x.ndim))
  dkeep = None if keep is None else jnp.zeros(keep.shape, jax.dtypes.float0)
  return dx.astype(x.dtype), s2.sum(0), s1.sum(0), dkeep


_group_norm_swish.defvjp(_fwd, _bwd)


def group_norm_swish(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, *,
                     epsilon: float = 1e-6, keep: Optional[jax.Array] = None, rate: float = 0.0) -> jax.Array:
  """``dropout(swish(GroupNorm(x)))`` with the hand-written gradient of the module docstring.

  Args:
    x: ``[B, …, C]``, any float dtype; the output has the same.
    scale, bias: ``[C]`` float32, GroupNorm's parameters.
    num_groups: G, dividing C; statistics over all non-batch axes and the
      C/G channels of a group, per example.
    epsilon: added to the variance (``flax.linen.GroupNorm``'s default).
    keep: boolean ``[B, …, C]`` dropout mask (True: kept) or None (no dropout).
    rate: the dropout rate; kept activations are divided by 1 − rate.
  """
  if x.shape[-1] % num_groups:
    raise ValueError(f"num_groups: {num_groups} does not divide the {x.shape[-1]} channels")
  if keep is not None and keep.shape != x.shape:
    raise ValueError(f"keep: expected the shape of x {x.shape}, got {keep.shape}")
  dtype = _compute_dtype(x)
  return _group_norm_swish(x, scale.astype(dtype), bias.astype(dtype), keep, num_groups,
                           float(epsilon), 1.0 - float(rate))

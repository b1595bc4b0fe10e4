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


def _grouped(x: jax.Array, num_groups: int) -> jax.Array:
  """``[B, …, C]`` → ``[B, …, G, C/G]``, in the compute dtype."""
  return x.reshape(x.shape[:-1] + (num_groups, x.shape[-1] // num_groups)).astype(_compute_dtype(x))


def _group_axes(ndim: int) -> tuple:
  """The axes of a grouped ``[B, …, G, C/G]`` array that a group's statistics reduce: all but B and G."""
  return tuple(range(1, ndim - 2)) + (ndim - 1,)


def _stats(xg: jax.Array, epsilon: float):
  """Per example and group: mean and 1/√(var + ε) ``[B, G]`` of grouped ``xg``, from one pass over it."""
  axes = _group_axes(xg.ndim)
  mean = xg.mean(axes)
  var = jnp.maximum(jnp.square(xg).mean(axes) - jnp.square(mean), 0.0)  # flax's fast variance
  return mean, jax.lax.rsqrt(var + epsilon)


def _per_group(v: jax.Array, ndim: int) -> jax.Array:
  """``[B, G]`` → ``[B, 1, …, 1, G, 1]``, broadcasting against a grouped array."""
  return v.reshape(v.shape[:1] + (1,) * (ndim - 3) + v.shape[1:] + (1,))


def _pre(xg, scale, bias, mean, rstd):
  """The normalised, scaled and shifted grouped input, and x̂; ``scale``, ``bias`` ``[G, C/G]``."""
  xhat = (xg - _per_group(mean, xg.ndim)) * _per_group(rstd, xg.ndim)
  return xhat * scale + bias, xhat


def _forward(x, scale, bias, keep, num_groups, epsilon, keep_prob):
  xg = _grouped(x, num_groups)
  mean, rstd = _stats(xg, epsilon)
  mean, rstd = checkpoint_name(mean, "norm_stats"), checkpoint_name(rstd, "norm_stats")
  pre, _ = _pre(xg, scale.reshape(xg.shape[-2:]), bias.reshape(xg.shape[-2:]), mean, rstd)
  y = (pre * jax.nn.sigmoid(pre)).reshape(x.shape)
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
  g = g.astype(_compute_dtype(x))
  if keep is not None:
    g = jnp.where(keep, g / keep_prob, 0.0)
  xg, g = _grouped(x, num_groups), _grouped(g, num_groups)
  scale = scale.reshape(xg.shape[-2:])
  pre, xhat = _pre(xg, scale, bias.reshape(xg.shape[-2:]), mean, rstd)
  sig = jax.nn.sigmoid(pre)
  d = g * sig * (1.0 + pre * (1.0 - sig))  # ∂L/∂pre
  axes = _group_axes(xg.ndim)
  m1 = (d * scale).mean(axes)  # [B, G]: mean_g(scale · d)
  m2 = (d * scale * xhat).mean(axes)  # mean_g(scale · d · x̂)
  dx = _per_group(rstd, xg.ndim) * (d * scale - _per_group(m1, xg.ndim) - xhat * _per_group(m2, xg.ndim))
  batch_axes = tuple(range(xg.ndim - 2))
  dscale, dbias = (d * xhat).sum(batch_axes).reshape(-1), d.sum(batch_axes).reshape(-1)
  dkeep = None if keep is None else jnp.zeros(keep.shape, jax.dtypes.float0)
  return dx.reshape(x.shape).astype(x.dtype), dscale, dbias, dkeep


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

"""The paper's score network ε̂(z_t; γ_t): a U-Net without downsampling.

Kingma et al. 2021, appendix B: ``num_blocks`` ResNet blocks at full
resolution going down, two middle blocks around one self-attention layer,
``num_blocks + 1`` blocks going up, each taking the matching down activation
by concatenation. ``channel_mult`` with more than one entry adds lower
resolutions (Ho et al. 2020): each further level halves height and width
with a strided convolution, the middle blocks run at the lowest, and the up
path mirrors the down path (nearest-neighbour upsampling and a convolution).
The paper's network is ``channel_mult=(1,)``; a small one at several
resolutions sees the whole image, which it needs to draw whole digits.
γ_t, rescaled to [0, 1], enters every block through a sinusoidal embedding
and two dense layers. Optional Fourier features of z_t are concatenated to
the input. The output convolution is zero-initialised and
the prediction is ``ε̂ = z_t + output``, so ε̂ = z_t at initialisation.

The identical blocks of each stack are compiled once with ``nn.scan``
(``scan_blocks=True``), so compile time does not grow with depth; the
unrolled form is kept for comparison and gives the same function of the same
weights (see :func:`unstack_params`).
"""

import functools
import logging
import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from vdm import convolution
from vdm import dropout as dropout_lib
from vdm import group_norm as group_norm_lib

Dtype = Any
GroupNormKernel = Union[str, group_norm_lib.Launch]  # "xla", "pallas" or the Pallas kernels' Launch

# What a rematerialised block keeps from its forward pass; the rest is recomputed.
REMAT_POLICIES = {
    "convs": jax.checkpoint_policies.save_only_these_names("conv"),  # norms, activations recomputed
    "full": jax.checkpoint_policies.nothing_saveable,  # the whole forward pass runs twice
}


SKIP_CONCATS = ("before_norm", "after_norm")  # where the up path's skips join, see ResnetBlock
SKIP_PROJECTIONS = ("dense", "conv")  # how an up block projects its input and skip apart, see _PartsDense
ATTENTION_KERNELS = ("xla", "cudnn")  # the attention blocks' softmax(q·kᵀ)·v, see AttnBlock


def _num_groups(channels: int, groups: int = 0) -> int:
  """``groups`` if given; else 32 as in the paper (128 channels: 4 per group).

  The automatic choice keeps narrow models at least 4 channels per group:
  with one channel per group the norm would subtract the per-channel
  conditioning offset entirely.
  """
  return groups or math.gcd(32, max(channels // 4, 1))


def _norm(x: jax.Array, dtype: Dtype, groups: int, kernel: GroupNormKernel, name: str, swish: bool = True,
          shift: Optional[jax.Array] = None, dropout: Optional[tuple[nn.Module, bool]] = None) -> jax.Array:
  """``dropout(swish(GroupNorm(x + shift)))`` (``swish=False``: without the swish), the same parameters and
  dropout masks for every ``kernel``.

  x ``[B, H, W, C]``; shift ``[B, C]`` or None; dropout: a
  :class:`vdm.dropout.Dropout` and whether the pass is deterministic, or
  None. "xla": ``nn.GroupNorm``, fused by XLA; "pallas" (or a
  :class:`vdm.group_norm.Launch`): one kernel each way (:mod:`vdm.group_norm`;
  the shift added and the dropout mask applied inside it) where it takes the
  shape (group count and size powers of two), else XLA's.
  """
  groups = _num_groups(x.shape[-1], groups)
  launch = group_norm_lib.launch(kernel)
  if launch and group_norm_lib.supported(x.shape[-1], groups):
    mask = dropout[0].mask(x.shape, dropout[1]) if dropout else None
    return group_norm_lib.GroupNormSwish(groups, dtype, swish, launch=launch, name=name)(x, shift, mask)
  x = x if shift is None else x + shift[:, None, None, :]
  h = nn.GroupNorm(num_groups=groups, dtype=dtype, name=name)(x)
  h = nn.swish(h) if swish else h
  return dropout[0](h, dropout[1]) if dropout else h


def _conv(features: int, dtype: Dtype, conv_grad: str, zero_init: bool = False,
          name: Optional[str] = None) -> nn.Conv:
  """A 3×3 same-padded convolution; ``conv_grad="dot"`` uses :func:`vdm.convolution.conv_dot_grad`."""
  extra = {"kernel_init": nn.initializers.zeros} if zero_init else {}
  return nn.Conv(features, (3, 3), dtype=dtype, name=name,
                 conv_general_dilated=convolution.conv_dot_grad if conv_grad == "dot" else None, **extra)


class _ConvBiasApart(nn.Module):
  """``nn.Conv(features, (3, 3))`` (the same parameters, initialisers and computation) that returns its
  output without the bias, and the bias: for a block that adds the bias to its conditioning inside the
  next norm. The bias's gradient is then the norm's per-example shift gradient summed over the batch, not
  a reduction over every activation's gradient (compiled for an H200: 130 kernels and 2.4 GB a step fewer
  with the Pallas norms; docs/performance.md)."""
  features: int
  dtype: Dtype
  conv_grad: str

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    conv = convolution.conv_dot_grad if self.conv_grad == "dot" else lax.conv_general_dilated
    y = conv(x, kernel, (1, 1), "SAME", lhs_dilation=(1, 1), rhs_dilation=(1, 1),
             dimension_numbers=lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)),
             feature_group_count=1, precision=None)
    return y, bias


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding of ``t`` ``[B]`` (any scale) → ``[B, dim]``."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def fourier_features(z: jax.Array, exponents: Sequence[int]) -> jax.Array:
  """sin and cos of 2^n · 2π · z for each exponent n, per channel.

  Args:
    z: ``[B, H, W, C]``.
    exponents: the base-2 exponents n (the paper: 6, 7).
  Returns:
    ``[B, H, W, 2 · C · len(exponents)]``.
  """
  w = 2.0 * math.pi * 2.0 ** jnp.asarray(exponents, jnp.float32)  # [F]
  h = (z[..., None] * w).reshape(z.shape[:-1] + (-1,))
  return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)


class _PartsGroupNorm(nn.Module):
  """swish(GroupNorm of ``concatenate(parts, -1)``) computed part by part, the results concatenated.

  The same function as ``nn.GroupNorm`` of the concatenation (the same
  parameters: ``scale`` and ``bias`` over all channels) when no group
  straddles two parts; the concatenation of the raw inputs is never formed.
  Parts are ``[B, H, W, C_i]``; statistics are float32 per example and group.
  """
  num_groups: int
  dtype: Dtype = jnp.float32
  kernel: GroupNormKernel = "xla"  # or "pallas"/a Launch: vdm.group_norm's kernel over all
  # parts, where it takes their shapes
  epsilon: float = 1e-6  # nn.GroupNorm's

  @nn.compact
  def __call__(self, parts: Sequence[jax.Array]) -> jax.Array:
    total = sum(part.shape[-1] for part in parts)
    scale = self.param("scale", nn.initializers.ones, (total,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (total,), jnp.float32)
    launch = group_norm_lib.launch(self.kernel)
    if launch and group_norm_lib.supported([part.shape[-1] for part in parts], self.num_groups):
      return group_norm_lib.group_norm(parts, scale, bias, self.num_groups, True, self.epsilon, self.dtype,
                                       launch=launch)
    size = total // self.num_groups
    outs, start = [], 0
    for part in parts:
      c = part.shape[-1]
      part_scale, part_bias = scale[start:start + c], bias[start:start + c]
      start += c
      x = part.reshape(part.shape[:-1] + (c // size, size))
      stats = x.astype(jnp.float32)  # float32 statistics, as nn.GroupNorm
      mean = stats.mean(axis=(1, 2, 4), keepdims=True)
      var = jnp.maximum(jnp.square(stats).mean(axis=(1, 2, 4), keepdims=True) - jnp.square(mean), 0.0)
      mul = lax.rsqrt(var + self.epsilon) * part_scale.reshape(c // size, size)
      y = (x - mean) * mul + part_bias.reshape(c // size, size)
      outs.append(nn.swish(y.reshape(part.shape).astype(self.dtype)))
    return jnp.concatenate(outs, axis=-1)


class _PartsDense(nn.Module):
  """``nn.Dense`` of ``concatenate(parts, -1)`` as a sum of one matmul per part (same parameters).

  Parameters are float32 and initialised as ``nn.Dense``'s, whatever the computation dtype. With
  ``as_convs`` each matmul is a 1×1 convolution of the ``[B, H, W, C]`` part: on a GPU cuDNN then adds
  the other part's projection in as a side input, and in the backward pass the part's other gradients,
  where matmuls each write their result for an addition to read (``execution.skip_projection``;
  docs/performance.md). The same function.
  """
  features: int
  dtype: Dtype = jnp.float32
  as_convs: bool = False

  @nn.compact
  def __call__(self, parts: Sequence[jax.Array]) -> jax.Array:
    total = sum(part.shape[-1] for part in parts)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (total, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    out, start = bias.astype(self.dtype), 0
    for part in parts:
      c = part.shape[-1]
      x, w = part.astype(self.dtype), kernel[start:start + c].astype(self.dtype)
      if self.as_convs:
        out = out + lax.conv_general_dilated(x, w[None, None], (1, 1), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
      else:
        out = out + jnp.dot(x, w)
      start += c
    return out


class ResnetBlock(nn.Module):
  """GroupNorm–swish–conv twice, conditioning added in between, residual.

  ``skip`` (the up path's matching down activation) joins the input by
  concatenation. ``skip_concat`` says where: "before_norm" concatenates the
  inputs, as the paper's code does; "after_norm" normalises the input and
  the skip separately and concatenates the normalised activations, so the
  concatenation of the raw inputs is never stored, and the residual's
  projection is one matmul per part. Both are the same function of the
  same parameters when no norm group straddles the two parts; where one
  would, or where the residual is not projected, "before_norm" is used.
  """
  channels: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  conv_grad: str = "dot"
  norm_groups: int = 0
  skip_concat: str = "before_norm"
  group_norm: GroupNormKernel = "xla"
  skip_projection: str = "dense"

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, deterministic: bool,
               skip: Optional[jax.Array] = None, shift: Optional[jax.Array] = None) -> jax.Array:
    """``shift``: the conditioning's projection ``Dense_0(cond)`` if the caller computed it (a scanned
    stack does, for all its blocks at once: :meth:`ScoreUNet._shifts`); None: computed here."""
    parts = (x,) if skip is None else (x, skip.astype(x.dtype))
    width = sum(part.shape[-1] for part in parts)
    groups = _num_groups(width, self.norm_groups)
    split = (len(parts) > 1 and self.skip_concat == "after_norm" and width != self.channels  # projected residual
             and all(part.shape[-1] % (width // groups) == 0 for part in parts))
    if split:
      h = _PartsGroupNorm(groups, self.dtype, self.group_norm, name="GroupNorm_0")(parts)
    else:
      x = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else x
      h = _norm(x, self.dtype, self.norm_groups, self.group_norm, "GroupNorm_0")
    h, conv_bias = _ConvBiasApart(self.channels, self.dtype, self.conv_grad, name="Conv_0")(h)
    h = checkpoint_name(h, "conv")
    if shift is None:  # the conditioning, [B, C]
      shift = nn.Dense(self.channels, use_bias=False, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                       name="Dense_0")(cond)
    shift = shift + conv_bias  # Conv_0's bias, added with the conditioning inside the norm
    h = _norm(h, self.dtype, self.norm_groups, self.group_norm, "GroupNorm_1", shift=shift,
              dropout=(dropout_lib.Dropout(self.dropout, name="Dropout_0"), deterministic))
    h = checkpoint_name(_conv(self.channels, self.dtype, self.conv_grad, zero_init=True, name="Conv_1")(h), "conv")
    if width != self.channels:
      x = (_PartsDense(self.channels, self.dtype, self.skip_projection == "conv", name="skip")(parts) if split
           else nn.Dense(self.channels, dtype=self.dtype, name="skip")(x)).astype(parts[0].dtype)
    # h first: cuDNN's rewriter lets the convolution of the first addend take the second as a side input
    # (XLA tries that order only), and a projection of parts as convolutions has taken one already.
    return h + x


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions, residual.

  ``kernel``: "xla" (flax's attention: the ``[B, heads, HW, HW]`` weights
  formed, ~5 GB of traffic a training step at the paper's CIFAR-10 shapes
  on a GPU) or "cudnn" (cuDNN's fused attention, ``jax.nn.dot_product_attention``:
  the weights never stored; 0.5 GB compiled for an H200) where the
  activations are bf16 or float16, and cuDNN takes them; elsewhere, or if
  cuDNN refuses when traced, flax's (logged). The same parameters and
  function (cuDNN's softmax in float32, flax's in the activations' dtype).
  """
  num_heads: int = 1
  dtype: Dtype = jnp.float32
  norm_groups: int = 0
  group_norm: GroupNormKernel = "xla"
  kernel: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    h = _norm(x, self.dtype, self.norm_groups, self.group_norm, "GroupNorm_0", swish=False)
    h = h.reshape(b, height * width, c)
    attend = _cudnn_attention if self.kernel == "cudnn" else nn.dot_product_attention
    h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype, attention_fn=attend,
                                        out_kernel_init=nn.initializers.zeros)(h, h)
    return x + h.reshape(x.shape)


def _cudnn_attention(query: jax.Array, key: jax.Array, value: jax.Array, dtype: Dtype = None,
                     precision=None) -> jax.Array:
  """flax's attention function as cuDNN's fused kernel (``[B, T, heads, D]`` in and out), where it applies."""
  if query.dtype in (jnp.bfloat16, jnp.float16):
    try:
      return jax.nn.dot_product_attention(query, key, value, implementation="cudnn")
    except (RuntimeError, ValueError, NotImplementedError) as e:  # e.g. no cuDNN, or one too old
      warn_once(f"attention: flax's, not cuDNN's fused kernel: {type(e).__name__}: {e}")
  return nn.dot_product_attention(query, key, value, dtype=dtype, precision=precision)


@functools.cache
def warn_once(message: str) -> None:
  """Logs ``message`` as a warning the first time it is given in this process (a fallback said once, not at
  every trace)."""
  logging.warning(message)


class _Layer(nn.Module):
  """One step of a stack: a ResNet block, then attention if asked.

  Going down it carries h and emits its input as a skip (the stack's skips
  are its blocks' inputs and, appended by the caller, the last block's
  output: a scanned stack's emitted inputs are the very arrays its
  backward pass keeps of them, where its outputs would be stored apart,
  33.5 MB a block at the paper's CIFAR-10 shapes in bf16); going up it
  carries h and consumes the matching skip by concatenation.
  """
  channels: int
  dropout: float
  attention: bool
  deterministic: bool
  dtype: Dtype
  conv_grad: str
  norm_groups: int = 0
  skip_concat: str = "before_norm"
  group_norm: GroupNormKernel = "xla"
  skip_projection: str = "dense"
  attention_kernel: str = "xla"

  @nn.compact
  def __call__(self, h, skip, cond, shift=None):
    h_in = h
    h = ResnetBlock(self.channels, self.dropout, self.dtype, self.conv_grad, self.norm_groups, self.skip_concat,
                    self.group_norm, self.skip_projection, name="resnet")(h, cond, self.deterministic, skip, shift)
    if self.attention:
      h = AttnBlock(dtype=self.dtype, norm_groups=self.norm_groups, group_norm=self.group_norm,
                    kernel=self.attention_kernel, name="attn")(h)
    return h, (h_in if skip is None else None)


class ScoreUNet(nn.Module):
  """ε̂(z_t; γ_t) for images ``[B, H, W, C]``; any H, W, C.

  Attributes:
    channels: width of the blocks at full resolution (the paper: 128 for
      CIFAR-10); lower levels have ``channels · channel_mult[l]``.
    num_blocks: ResNet blocks going down at each resolution (the paper: 32);
      up has one more.
    channel_mult: width of each resolution level as a multiple of
      ``channels``, full resolution first; each further level halves H and
      W (which must then be divisible by 2^(levels − 1)). (1,) is the
      paper's single-resolution network.
    dropout: dropout rate inside the blocks.
    mid_attention: self-attention between the two middle blocks (the paper's).
    attention_everywhere: self-attention after every block, not only in the middle.
    fourier_exponents: base-2 exponents of Fourier features; empty for none.
    norm_groups: groups of every GroupNorm; 0 (default) chooses 32, fewer for
      narrow layers so each group has at least 4 channels. The 2022
      reference code always used 32.
    gamma_min, gamma_max: the range mapped to [0, 1] before the embedding.
    scan_blocks: compile each stack of identical blocks once (``nn.scan``).
    remat: recompute block activations in the backward pass (saves memory).
    remat_policy: what a rematerialised block keeps, see ``REMAT_POLICIES``:
      "convs" (its convolutions' outputs; only norms and activations are
      recomputed) or "full" (nothing; the whole forward pass runs twice).
    scan_unroll: blocks per iteration of a scanned stack's loop (the same
      function; fewer, larger iterations, longer compilation); at least the
      stack's length: no loop, and under remat the recomputation can merge
      with the forward pass (no CSE barrier in scanned stacks).
    skip_concat: where the up path's skips join (see :class:`ResnetBlock`):
      "before_norm" (the paper's code) or "after_norm" (the same function
      without storing the concatenated inputs).
    skip_projection: with "after_norm", how an up block projects its input
      and skip for the residual: "dense" (a matmul each) or "conv" (a 1×1
      convolution each, whose additions cuDNN fuses on GPUs). The same
      function and parameters.
    attention_kernel: the attention blocks' kernel, "xla" or "cudnn" (see
      :class:`AttnBlock`).
    group_norm: the GroupNorms' kernels: "xla" (``nn.GroupNorm``, fused by
      XLA), "pallas" (:mod:`vdm.group_norm`'s, where they take the shape) or
      a :class:`vdm.group_norm.Launch` (those, launched as it says). The
      same parameters and function.
    dtype: computation dtype of the blocks (bfloat16 for mixed precision);
      params, the input and output convolutions and ε̂ stay float32.
    float32_residuals: with a bf16 ``dtype``, carry the residual stream
      between blocks (and so the skips) in float32; the blocks compute in
      ``dtype``.
    conv_grad: "dot" (the backward pass of the 3×3 convolutions written as
      matmuls, see :func:`vdm.convolution.conv_dot_grad`; fast inside ``nn.scan`` on CPU) or
      "xla" (XLA's own convolution gradients).
    num_augmentations: > 0 for a network trained on augmented data: its
      conditioning is then the integer code ``[B]`` of the augmentation
      applied to each example (one-hot embedded); none given means code 0,
      the identity, as in evaluation and sampling.
    num_classes: K > 0 for a class-conditional network: ``labels`` ``[B]`` in
      {0, …, K} (K is the null class of classifier-free guidance, also what
      no labels mean) add a learned embedding to the time embedding.
    patch_size: p > 1 runs the U-Net on p×p patches (space to depth: an
      H×W×C image becomes H/p × W/p × p²C, Fourier features included, and
      back at the output; Hoogeboom et al. 2023): the full-resolution
      level, the dearest, is gone. H and W must be divisible by
      p · 2^(levels − 1).
    input_skip: the output is z + F(z), as in the paper's code (for ε-prediction
      the skip is ε̂ ≈ z at high noise, where z ≈ ε); False: F(z) alone, for
      a network that predicts v = α ε − σ x, which is close to z at no noise
      level (so F would have to cancel z).
    matmul_precision: ``jax.default_matmul_precision`` for the network's
      matmuls and convolutions; "highest" is true float32 (GPUs otherwise
      may use TF32), None leaves JAX's default.
  """
  channels: int = 128
  num_blocks: int = 32
  channel_mult: Sequence[int] = (1,)
  dropout: float = 0.1
  mid_attention: bool = True
  attention_everywhere: bool = False
  fourier_exponents: Sequence[int] = (6, 7)
  norm_groups: int = 0
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  scan_blocks: bool = True
  remat: bool = False
  remat_policy: str = "convs"
  scan_unroll: int = 1
  skip_concat: str = "before_norm"
  group_norm: GroupNormKernel = "xla"
  skip_projection: str = "dense"
  attention_kernel: str = "xla"
  dtype: Dtype = jnp.float32
  float32_residuals: bool = False
  conv_grad: str = "dot"
  num_augmentations: int = 0
  num_classes: int = 0
  patch_size: int = 1
  input_skip: bool = True
  matmul_precision: Optional[str] = "highest"

  @nn.compact
  def __call__(self, z: jax.Array, gamma_t: jax.Array, conditioning: Optional[jax.Array] = None,
               *, labels: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
    """Args: z ``[B, H, W, C]``; gamma_t scalar or ``[B]``; conditioning ``[B, K]``;
    labels ``[B]`` integers (``num_classes`` > 0; None: the null class).

    Returns: ε̂ ``[B, H, W, C]``, float32.
    """
    if self.matmul_precision is None:
      return self._eps_hat(z, gamma_t, conditioning, labels, train)
    with jax.default_matmul_precision(self.matmul_precision):
      return self._eps_hat(z, gamma_t, conditioning, labels, train)

  def _eps_hat(self, z, gamma_t, conditioning, labels, train):
    deterministic = not train
    batch = z.shape[0]
    gamma_t = jnp.broadcast_to(jnp.asarray(gamma_t, jnp.float32), (batch,))
    t = (gamma_t - self.gamma_min) / (self.gamma_max - self.gamma_min)
    emb_dim = 4 * self.channels
    cond = timestep_embedding(t * 1000.0, self.channels)
    if self.num_augmentations:
      codes = jnp.zeros((batch,), jnp.int32) if conditioning is None else conditioning
      conditioning = jax.nn.one_hot(codes, self.num_augmentations)
    if conditioning is not None:
      cond = jnp.concatenate([cond, conditioning.astype(jnp.float32)], axis=-1)
    cond = nn.swish(nn.Dense(emb_dim, dtype=self.dtype, name="temb_0")(cond))
    cond = nn.swish(nn.Dense(emb_dim, dtype=self.dtype, name="temb_1")(cond))
    if self.num_classes:  # the class embedding joins the time embedding (Dhariwal & Nichol 2021)
      labels = jnp.full((batch,), self.num_classes, jnp.int32) if labels is None else labels
      cond = cond + nn.Embed(self.num_classes + 1, emb_dim, name="label_emb")(labels).astype(cond.dtype)

    h = z.astype(jnp.float32)
    if self.fourier_exponents:
      h = jnp.concatenate([h, fourier_features(h, self.fourier_exponents)], axis=-1)
    if self.skip_concat not in SKIP_CONCATS:
      raise ValueError(f"skip_concat: expected one of {SKIP_CONCATS}, got {self.skip_concat!r}")
    if self.skip_projection not in SKIP_PROJECTIONS:
      raise ValueError(f"skip_projection: expected one of {SKIP_PROJECTIONS}, got {self.skip_projection!r}")
    if self.attention_kernel not in ATTENTION_KERNELS:
      raise ValueError(f"attention_kernel: expected one of {ATTENTION_KERNELS}, got {self.attention_kernel!r}")
    group_norm_lib.launch(self.group_norm)  # a ValueError unless "xla", "pallas" or a Launch
    levels, factor = len(self.channel_mult), size_divisor(self.channel_mult, self.patch_size)
    if z.shape[1] % factor or z.shape[2] % factor:
      on_patches = f" on {self.patch_size}×{self.patch_size} patches" if self.patch_size > 1 else ""
      raise ValueError(f"model.network.channel_mult: {levels} resolution levels{on_patches} need height and width "
                       f"divisible by {factor}, got {z.shape[1]}×{z.shape[2]}")
    h = space_to_depth(h, self.patch_size)
    widths = [self.channels * m for m in self.channel_mult]
    stream = jnp.float32 if self.float32_residuals else self.dtype  # the residual stream's dtype

    skips = []  # per level: [num_blocks + 1, B, H_l, W_l, C_l], the level's input first
    for level, width in enumerate(widths):
      if level == 0:
        # In float32 whatever the dtype: rounded to bfloat16 (spacing 2^-8 near 1), z_t loses the detail
        # that ε is at low noise (σ ≈ 0.001). The blocks then run in the computation dtype.
        h = _conv(width, jnp.float32, self.conv_grad, name="conv_in")(h).astype(stream)
      else:  # half the resolution: a strided 3×3 convolution
        h = nn.Conv(width, (3, 3), strides=(2, 2), dtype=self.dtype, name=f"downsample_{level}")(h).astype(stream)
      h, down = self._stack(_stack_name("down", level), width, h, None, cond, deterministic)
      skips.append(jnp.concatenate([down, h[None]]))  # each block's input, then the last one's output

    mid_layer = lambda name, attention: _Layer(  # noqa: E731
        widths[-1], self.dropout, attention, deterministic, self.dtype, self.conv_grad, self.norm_groups,
        group_norm=self.group_norm, attention_kernel=self.attention_kernel, name=name)
    h, _ = mid_layer("mid_0", self.mid_attention or self.attention_everywhere)(h, None, cond)
    h, _ = mid_layer("mid_1", False)(h, None, cond)

    # Up consumes each level's down activations last-in first-out, the level's input last.
    for level in reversed(range(levels)):
      if level < levels - 1:  # double the resolution: nearest neighbour, then a 3×3 convolution
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = _conv(widths[level], self.dtype, self.conv_grad, name=f"upsample_{level}")(h).astype(stream)
      h, _ = self._stack(_stack_name("up", level), widths[level], h, skips[level][::-1], cond, deterministic)

    h = _norm(h, self.dtype, self.norm_groups, self.group_norm, "norm_out")
    out = _conv(z.shape[-1] * self.patch_size**2, jnp.float32, self.conv_grad, zero_init=True,
                name="conv_out")(h)  # float32, as conv_in
    out = depth_to_space(out, self.patch_size)
    return z.astype(jnp.float32) + out if self.input_skip else out

  def _stack(self, name: str, channels: int, h: jax.Array, skips: Optional[jax.Array], cond: jax.Array,
             deterministic: bool):
    """Runs a stack of identical layers; ``skips`` [L, …] (up) or None (down)."""
    length = self.num_blocks if skips is None else self.num_blocks + 1
    # Inside a scan no CSE can merge the recomputation with the forward pass, so the remat needs no barrier
    # (JAX's advice); without one XLA reads the stacked residuals in place instead of copying each out
    # (compiled for an H200: 652 fewer kernels a step, docs/performance.md). Unrolled, the barrier stays.
    layer = (nn.remat(_Layer, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan_blocks)
             if self.remat else _Layer)
    args = (channels, self.dropout, self.attention_everywhere, deterministic, self.dtype,
            self.conv_grad, self.norm_groups, self.skip_concat, self.group_norm, self.skip_projection,
            self.attention_kernel)
    if self.scan_blocks:
      stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast if skips is None else 0, nn.broadcast, 0), length=length,
                      unroll=self.scan_unroll)
      if self.dtype != jnp.float32 and not self.is_initializing():
        # The blocks would cast their slices of the stacked weights in every iteration and pass (on a GPU
        # ~400 small kernels a step); cast once before the loop instead. The same values, bit for bit.
        stack = nn.map_variables(stack, "params", trans_in_fn=lambda tree: _cast_weights(tree, self.dtype))
      return stack(*args, name=name)(h, skips, cond, self._shifts(name, cond))
    outs = []
    for i in range(length):
      h, out = layer(*args, name=f"{name}_{i}")(h, None if skips is None else skips[i], cond)
      outs.append(out)
    return h, (jnp.stack(outs) if skips is None else None)


  def _shifts(self, name: str, cond: jax.Array) -> Optional[jax.Array]:
    """Every block's conditioning projection of the scanned stack ``name``, ``[L, B, C]``, as one matmul
    before its loop (None while initialising: each block then creates its ``Dense_0`` parameters).

    Inside the loop each block would project ``cond`` with its slice of the stacked ``resnet/Dense_0``
    kernel: on a GPU a small split matmul and its reduction, recomputed under remat, and a gradient of
    its own, ~570 of a step's ~7,650 kernels for the paper's CIFAR-10 network (docs/performance.md).
    The same parameters (read here from the stack), the same function and gradient (tested).
    """
    if self.is_initializing():
      return None
    kernel = self.variables["params"][name]["resnet"]["Dense_0"]["kernel"]  # [L, E, C]
    return jnp.einsum("be,lec->lbc", cond.astype(self.dtype), kernel.astype(self.dtype))


def _cast_weights(tree, dtype):
  """The matmuls' and convolutions' parameters in ``dtype``; the norms' (any module named ``GroupNorm…``) kept."""
  def cast(path, leaf):
    in_norm = any(getattr(k, "key", "").startswith("GroupNorm") for k in path)
    return leaf if in_norm or not jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.astype(dtype)
  return jax.tree_util.tree_map_with_path(cast, tree)


def size_divisor(channel_mult: Sequence[int], patch_size: int = 1) -> int:
  """What image height and width must be divisible by: the patch size, and 2 for each halving between levels."""
  return patch_size * 2 ** (len(channel_mult) - 1)


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
  """``[B, H, W, C]`` → ``[B, H/p, W/p, p·p·C]``: each p×p patch's pixels as channels (row, column, channel)."""
  if p == 1:
    return x
  b, height, width, c = x.shape
  x = x.reshape(b, height // p, p, width // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height // p, width // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
  """The inverse of :func:`space_to_depth`."""
  if p == 1:
    return x
  b, height, width, c = x.shape
  x = x.reshape(b, height, width, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height * p, width * p, c // (p * p))


def _stack_name(direction: str, level: int) -> str:
  """"down"/"up" at full resolution (the paper's names), "down1", "up1", … below it."""
  return direction if level == 0 else f"{direction}{level}"


def _stacks(num_blocks: int, num_levels: int):
  for level in range(num_levels):
    yield _stack_name("down", level), num_blocks
    yield _stack_name("up", level), num_blocks + 1


def unstack_params(params: dict, num_blocks: int, num_levels: int = 1) -> dict:
  """Converts a scanned network's params to the unrolled form's names."""
  params = dict(params)
  for name, length in _stacks(num_blocks, num_levels):
    stacked = params.pop(name)
    for i in range(length):
      params[f"{name}_{i}"] = jax.tree.map(lambda leaf: leaf[i], stacked)
  return params


def _stack(*leaves):
  """Host arrays stay on the host (a checkpoint being converted); device arrays are stacked by JAX."""
  return np.stack(leaves) if all(isinstance(leaf, np.ndarray) for leaf in leaves) else jnp.stack(leaves)


def stack_params(params: dict, num_blocks: int, num_levels: int = 1) -> dict:
  """The inverse of :func:`unstack_params`: ``down_i``/``up_i`` → stacked ``down``/``up``."""
  params = dict(params)
  for name, length in _stacks(num_blocks, num_levels):
    layers = [params.pop(f"{name}_{i}") for i in range(length)]
    params[name] = jax.tree.map(_stack, *layers)
  return params

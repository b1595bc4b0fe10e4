"""The paper's score network ε̂(z_t; γ_t): a U-Net without downsampling.

Kingma et al. 2021, appendix B: ``num_blocks`` ResNet blocks at full
resolution going down, two middle blocks around one self-attention layer,
``num_blocks + 1`` blocks going up, each taking the matching down activation
by concatenation. γ_t, rescaled to [0, 1], enters every block through a
sinusoidal embedding and two dense layers. Optional Fourier features of z_t
are concatenated to the input. The output convolution is zero-initialised and
the prediction is ``ε̂ = z_t + output``, so ε̂ = z_t at initialisation.

The identical blocks of each stack are compiled once with ``nn.scan``
(``scan_blocks=True``), so compile time does not grow with depth; the
unrolled form is kept for comparison and gives the same function of the same
weights (see :func:`unstack_params`).
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _num_groups(channels: int) -> int:
  # 32 groups as in the paper (128 channels: 4 per group). Narrow models keep
  # at least 4 channels per group: with one channel per group the norm would
  # subtract the per-channel conditioning offset entirely.
  return math.gcd(32, max(channels // 4, 1))


def _group_norm(channels: int, dtype: Dtype, name: Optional[str] = None) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=_num_groups(channels), dtype=dtype, name=name)


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


class ResnetBlock(nn.Module):
  """GroupNorm–swish–conv twice, conditioning added in between, residual."""
  channels: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, deterministic: bool) -> jax.Array:
    h = nn.swish(_group_norm(x.shape[-1], self.dtype)(x))
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype)(h)
    h = h + nn.Dense(self.channels, use_bias=False, kernel_init=nn.initializers.zeros,
                     dtype=self.dtype)(cond)[:, None, None, :]
    h = nn.swish(_group_norm(self.channels, self.dtype)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = nn.Conv(self.channels, (3, 3), kernel_init=nn.initializers.zeros, dtype=self.dtype)(h)
    if x.shape[-1] != self.channels:
      x = nn.Dense(self.channels, dtype=self.dtype, name="skip")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions, residual."""
  num_heads: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    h = _group_norm(c, self.dtype)(x).reshape(b, height * width, c)
    h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        out_kernel_init=nn.initializers.zeros)(h, h)
    return x + h.reshape(x.shape)


class _Layer(nn.Module):
  """One step of a stack: a ResNet block, then attention if asked.

  Going down it carries h and emits it as a skip; going up it carries h and
  consumes the matching skip by concatenation.
  """
  channels: int
  dropout: float
  attention: bool
  deterministic: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, h, skip, cond):
    x = h if skip is None else jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
    h = ResnetBlock(self.channels, self.dropout, self.dtype, name="resnet")(
        x, cond, self.deterministic)
    if self.attention:
      h = AttnBlock(dtype=self.dtype, name="attn")(h)
    return h, (h if skip is None else None)


class ScoreUNet(nn.Module):
  """ε̂(z_t; γ_t) for images ``[B, H, W, C]``; any H, W, C.

  Attributes:
    channels: width of every block (the paper: 128 for CIFAR-10).
    num_blocks: ResNet blocks going down (the paper: 32); up has one more.
    dropout: dropout rate inside the blocks.
    mid_attention: self-attention between the two middle blocks (the paper's).
    attention_everywhere: self-attention after every block, not only in the middle.
    fourier_exponents: base-2 exponents of Fourier features; empty for none.
    gamma_min, gamma_max: the range mapped to [0, 1] before the embedding.
    scan_blocks: compile each stack of identical blocks once (``nn.scan``).
    remat: recompute block activations in the backward pass (saves memory).
    dtype: computation dtype (bfloat16 for mixed precision); params stay float32.
  """
  channels: int = 128
  num_blocks: int = 32
  dropout: float = 0.1
  mid_attention: bool = True
  attention_everywhere: bool = False
  fourier_exponents: Sequence[int] = (6, 7)
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  scan_blocks: bool = True
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, gamma_t: jax.Array, conditioning: Optional[jax.Array] = None,
               *, train: bool = False) -> jax.Array:
    """Args: z ``[B, H, W, C]``; gamma_t scalar or ``[B]``; conditioning ``[B, K]``.

    Returns: ε̂ ``[B, H, W, C]``, float32.
    """
    deterministic = not train
    batch = z.shape[0]
    gamma_t = jnp.broadcast_to(jnp.asarray(gamma_t, jnp.float32), (batch,))
    t = (gamma_t - self.gamma_min) / (self.gamma_max - self.gamma_min)
    emb_dim = 4 * self.channels
    cond = timestep_embedding(t * 1000.0, self.channels)
    if conditioning is not None:
      cond = jnp.concatenate([cond, conditioning.astype(jnp.float32)], axis=-1)
    cond = nn.swish(nn.Dense(emb_dim, dtype=self.dtype, name="temb_0")(cond))
    cond = nn.swish(nn.Dense(emb_dim, dtype=self.dtype, name="temb_1")(cond))

    h = z.astype(jnp.float32)
    if self.fourier_exponents:
      h = jnp.concatenate([h, fourier_features(h, self.fourier_exponents)], axis=-1)
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype, name="conv_in")(h)

    h_in = h
    h, down = self._stack("down", h, None, cond, deterministic)  # down: [N, B, H, W, C]

    mid_layer = lambda name, attention: _Layer(  # noqa: E731
        self.channels, self.dropout, attention, deterministic, self.dtype, name=name)
    h, _ = mid_layer("mid_0", self.mid_attention or self.attention_everywhere)(h, None, cond)
    h, _ = mid_layer("mid_1", False)(h, None, cond)

    # Up consumes the down activations last-in first-out, conv_in's last.
    skips = jnp.concatenate([h_in[None], down])[::-1]  # [N + 1, B, H, W, C]
    h, _ = self._stack("up", h, skips, cond, deterministic)

    h = nn.swish(_group_norm(self.channels, self.dtype, "norm_out")(h))
    out = nn.Conv(z.shape[-1], (3, 3), kernel_init=nn.initializers.zeros, dtype=self.dtype,
                  name="conv_out")(h)
    return z.astype(jnp.float32) + out.astype(jnp.float32)

  def _stack(self, name: str, h: jax.Array, skips: Optional[jax.Array], cond: jax.Array,
             deterministic: bool):
    """Runs a stack of identical layers; ``skips`` [L, …] (up) or None (down)."""
    length = self.num_blocks if skips is None else self.num_blocks + 1
    layer = nn.remat(_Layer) if self.remat else _Layer
    args = (self.channels, self.dropout, self.attention_everywhere, deterministic, self.dtype)
    if self.scan_blocks:
      stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast if skips is None else 0, nn.broadcast), length=length)
      return stack(*args, name=name)(h, skips, cond)
    outs = []
    for i in range(length):
      h, out = layer(*args, name=f"{name}_{i}")(h, None if skips is None else skips[i], cond)
      outs.append(out)
    return h, (jnp.stack(outs) if skips is None else None)


def unstack_params(params: dict, num_blocks: int) -> dict:
  """Converts a scanned network's params to the unrolled form's names."""
  params = dict(params)
  for name, length in (("down", num_blocks), ("up", num_blocks + 1)):
    stacked = params.pop(name)
    for i in range(length):
      params[f"{name}_{i}"] = jax.tree.map(lambda leaf: leaf[i], stacked)
  return params

"""Dropout masks at a GPU's speed: one Threefry call for every four activations.

``jax.random.bernoulli`` draws 32 random bits per activation, and JAX's
keys compute a whole generator call for each 32 bits they return (a
Threefry-2x32 call gives 64 bits, a Philox4x32 call 128; JAX XORs them
down to 32). A dropout mask of the paper's CIFAR-10 network (128 × 32 × 32
× 128 activations) so costs 16.8 M calls of compute-bound integer work.
On an H200 the kernels that draw and apply the masks took 12 ms of a 96 ms
step with Philox keys, as remat draws each mask three times (forward,
recomputed forward, backward); kept from the forward pass, the masks still
cost 5.9 ms to draw (the profiles in benchmarks/device_runs/2026-11-27-h200-b/).

:func:`keep_mask` uses every bit: each Threefry-2x32-20 call's two 32-bit
words are split into four 16-bit uniforms, one per activation, so a mask
costs 1/4 of the calls. The keep probability is rounded to a multiple of
2⁻¹⁶ (0.9 becomes 58982/65536 = 0.9000092) and :class:`Dropout` divides
the kept activations by that rounded value, so E[output] = input exactly.
It is ``execution.dropout_rng="packed"``: the step's dropout key is
rewrapped as a :data:`PACKED` key, which splits and folds in as Threefry
does and tells :class:`Dropout` to draw its mask so. Only standard integer
operations are involved: the same bits on every backend and sharding
(a Philox call needs a 32 × 32 → 64-bit product, ``lax.mulhi``, which
JAX 0.10.2 cannot partition: with the batch sharded over devices the
``"philox"`` key fails to compile).

Threefry-2x32-20: Salmon et al. 2011, "Parallel random numbers: as easy
as 1, 2, 3" (the Random123 library; its known-answer vectors are in the
tests), through ``jax.extend.random.threefry2x32_p``.
"""

import functools
import math
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton
from jax.sharding import PartitionSpec as P

BITS = 16  # per activation: four activations per 64-bit call

_THREEFRY = jex_random.threefry_prng_impl
PACKED = jex_random.define_prng_impl(key_shape=_THREEFRY.key_shape, seed=_THREEFRY.seed, split=_THREEFRY.split,
                                     random_bits=_THREEFRY.random_bits, fold_in=_THREEFRY.fold_in,
                                     name="threefry2x32_packed", tag="fryp")
"""Threefry-2x32 keys (split and fold in as Threefry does) whose dropout masks :func:`keep_mask` draws."""


def packed_key(key: jax.Array) -> jax.Array:
  """``key`` (a typed key of two uint32 words, e.g. Threefry's) as a :data:`PACKED` key of the same data."""
  return jax.random.wrap_key_data(jax.random.key_data(key), impl=PACKED)


def keep_threshold(keep_prob: float) -> int:
  """The keep probability in units of 2⁻¹⁶: an activation is kept when its 16-bit uniform is below this."""
  if not 0.0 < keep_prob <= 1.0:
    raise ValueError(f"keep_prob: expected a probability in (0, 1], got {keep_prob}")
  return max(1, min(1 << BITS, round(keep_prob * (1 << BITS))))


def keep_mask(key: jax.Array, keep_prob: float, shape: tuple) -> jax.Array:
  """Boolean mask of ``shape``: True with probability ``keep_threshold(keep_prob) / 65536`` (:func:`keep_bytes`
  as booleans)."""
  return keep_bytes(key, keep_prob, shape) != 0


def keep_bytes(key: jax.Array, keep_prob: float, shape: tuple) -> jax.Array:
  """int8 mask of ``shape``: 1 with probability ``keep_threshold(keep_prob) / 65536``, else 0.

  In the bytes the GroupNorm kernels read (:mod:`vdm.group_norm`) and the mask kernel writes, so no pass
  converts one into the other.

  ``key``: a typed key of two uint32 words (k0, k1). The mask, row-major,
  viewed as ``[B, 4, M]`` (:func:`quarters`: B the batch, M a quarter of an
  example's activations): activation ``(b, q, j)`` takes bits ``16 (q mod
  2)`` to ``16 (q mod 2) + 15`` of word ``⌊q / 2⌋`` of the Threefry-2x32-20
  call with counter (b M + j, 0). So the four activations of a call lie a
  quarter of an example apart, not side by side: each quarter is its own
  contiguous run of the words' halves, which every backend lays out as it
  lays out the activations (side by side, a TPU's tiled layout padded the
  calls' 4 halves to 128 lanes and copied them: XLA's TPU cost model put
  that at half the CIFAR-10 step on one v5e chip). On GPUs, where each
  example's activations fill whole programs, :func:`mask_kernel` draws it
  (traced for several devices, each device its own examples); elsewhere
  :func:`traced_mask`: the same bits.
  """
  k0, k1 = jax.random.key_data(key).astype(jnp.uint32)
  size = math.prod(shape)
  examples, calls = quarters(shape)
  if examples * calls >= 1 << 32:
    raise ValueError(f"keep_bytes: {size} activations need more than 2³² counters")
  threshold = keep_threshold(keep_prob)
  mesh = jax.sharding.get_abstract_mesh()  # the one the program is traced for (vdm.sharding.on_mesh), if any
  devices = dict(mesh.shape).get("data", 1)
  if devices > 1 and examples == shape[0] and examples % devices == 0:
    # Traced for several devices (vdm.sharding.on_mesh): each draws its own examples' bits, from their
    # counters. XLA would split the traced form over the batch itself, but not a custom call (the mask
    # kernel; Threefry as JAX's GPU kernel): each device would draw the whole batch's mask.
    local = (examples // devices,) + tuple(shape[1:])
    def draw(k0, k1):
      first = lax.axis_index("data") * local[0]
      return _draw(k0, k1, local, threshold, first)
    return jax.shard_map(draw, mesh=mesh, in_specs=(P(), P()), out_specs=P("data"), check_vma=False)(k0, k1)
  if jax.device_count() > 1 or devices > 1:  # a custom call XLA cannot split: the traced form, which it can
    return traced_mask(k0, k1, shape, threshold).astype(jnp.int8)
  return _draw(k0, k1, shape, threshold)


def _draw(k0, k1, shape: tuple, threshold: int, first=0) -> jax.Array:
  """The int8 mask of ``shape`` (examples from ``first`` on, :func:`traced_mask`): by :func:`mask_kernel` on a
  GPU where each example fills whole programs and the kernel is on, else traced."""
  examples, calls = quarters(shape)
  traced = lambda k0, k1, first: traced_mask(k0, k1, shape, threshold, first=first).astype(jnp.int8)  # noqa: E731
  if math.prod(shape) != 4 * examples * calls or calls % KERNEL_CALLS or not kernel_enabled():
    return traced(k0, k1, first)
  kernel = lambda k0, k1, first: mask_kernel(k0, k1, examples, calls, threshold,  # noqa: E731
                                             first=first).reshape(shape)
  return lax.platform_dependent(k0, k1, jnp.asarray(first, jnp.int32), cuda=kernel, rocm=kernel, default=traced)


def quarters(shape: tuple) -> tuple[int, int]:
  """(B, M): a mask of ``shape`` viewed as ``[B, 4, M]``, where activation ``(b, q, j)`` takes 16-bit half ``q``
  of Threefry call ``b M + j``. B is the leading axis (the batch, so each example's bits come from calls of
  its own) where the rest of the shape is a multiple of 4; else 1 (M = ⌈size / 4⌉, the last call used in part)."""
  size = math.prod(shape)
  if len(shape) >= 2 and shape[0] and (size // shape[0]) % 4 == 0:
    return shape[0], size // shape[0] // 4
  return 1, -(-size // 4)


def traced_mask(k0: jax.Array, k1: jax.Array, shape: tuple, threshold: int, first=0) -> jax.Array:
  """:func:`keep_mask` as XLA ops (off GPUs, and for any shape): the Threefry words, then their halves.

  ``first``: the index of ``shape``'s first example in a larger batch (its counters follow the examples
  before it; with :func:`quarters` splitting off the leading axis): the mask of those examples in the
  whole batch's.
  """
  size = math.prod(shape)
  examples, calls = quarters(shape)
  # The calls laid out as the mask's first quarter along axis 1 where that axis divides by 4, so the halves
  # join along a major axis: no activation's bits are interleaved with another call's within the minor
  # dimension, which a TPU's tiled layouts would pad to 128 lanes and copy (4 × 32 × the mask's bytes).
  split = len(shape) >= 2 and examples == shape[0] and shape[1] % 4 == 0
  layout = (shape[0], shape[1] // 4) + tuple(shape[2:]) if split else (examples, calls)
  counters = (lax.iota(jnp.uint32, examples * calls) + jnp.uint32(calls) * jnp.asarray(first, jnp.uint32)
              ).reshape(layout)
  words = jex_random.threefry2x32_p.bind(k0, k1, counters, jnp.zeros_like(counters))
  # Materialised, so each call runs once: fused into the mask's consumer, XLA would run it again for
  # each of its four activations. The rest is elementwise and fuses there.
  w0, w1 = lax.optimization_barrier(words)
  halves = jnp.concatenate([w0 & 0xFFFF, w0 >> 16, w1 & 0xFFFF, w1 >> 16], axis=1)  # [B, 4 × …]: (b, q, j)
  return (halves.reshape(-1)[:size] < threshold).reshape(shape)  # the slice: a last call used in part


def kernel_enabled() -> bool:
  """Whether :func:`keep_bytes` may use :func:`mask_kernel` on a GPU: unless the environment sets
  ``VDM_DROPOUT_KERNEL=0`` (the traced form everywhere: the same bits; a way out should the kernel fail to
  compile with some JAX version, and the device check's when ``benchmarks/pallas_check.py`` finds it wrong)
  or :func:`check_kernel` found it wrong here."""
  return os.environ.get("VDM_DROPOUT_KERNEL", "1") != "0" and not any(_checked)


_checked: list[Optional[str]] = []  # check_kernel's finding in this process, once it ran: None, or why not


def check_kernel(interpret: bool = False) -> Optional[str]:
  """Runs :func:`mask_kernel` once against :func:`traced_mask` where :func:`keep_bytes` would use it (a
  GPU, the kernel not turned off: on the first device; ``interpret``: here too, in Pallas's interpreter,
  for tests): four programs' bits (two examples of two) compared byte for byte. None if they agree, or
  where the kernel is not used; else why, and from then on :func:`kernel_enabled` is False in this process
  (the traced mask: the same bits, the step XLA's as before the kernel). :func:`vdm.training.setup` runs it
  for configs with packed masks, so a GPU whose Triton does not take the kernel still trains.
  """
  if _checked:
    return _checked[0]
  if not kernel_enabled() or not interpret and jax.default_backend() != "gpu":
    return None
  k0, k1 = jnp.uint32(0x12345678), jnp.uint32(0x9ABCDEF0)
  examples, calls, threshold = 2, 2 * KERNEL_CALLS, keep_threshold(0.9)  # four programs
  try:
    got = np.asarray(mask_kernel(k0, k1, examples, calls, threshold, interpret=interpret))
    want = np.asarray(traced_mask(k0, k1, (examples, 4, calls), threshold)).astype(np.int8)
    wrong = int(np.sum(got != want))
    why = None if wrong == 0 else f"{wrong} of its {want.size} mask bytes differ from the traced mask"
  except Exception as e:  # a lowering or launch failure: this GPU's Triton does not take it
    why = f"{type(e).__name__}: {str(e)[:300]}"
  if why is not None:
    why = f"the dropout mask kernel on {jax.devices()[0].device_kind}: {why}; the traced mask instead"
  _checked.append(why)
  return why


KERNEL_CALLS = 1024  # Threefry calls per program of :func:`mask_kernel` (4,096 activations)
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32's, alternating every four rounds


def _threefry(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32-20 of the counter words (x0, x1) under the key (k0, k1), as JAX computes it
  (``jax.extend.random.threefry2x32_p``): 20 rounds, the key injected every four."""
  ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = (x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))
      x1 = x0 ^ x1
    x0, x1 = x0 + ks[(i + 1) % 3], x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
  return x0, x1


def _mask_program(k0_ref, k1_ref, first_ref, out_ref, *, calls: int, threshold: int):
  example = first_ref[0] + pl.program_id(0)  # in the whole batch
  first = example * calls + pl.program_id(1) * KERNEL_CALLS  # example b's calls start at b × calls
  counters = first.astype(jnp.uint32) + lax.iota(jnp.uint32, KERNEL_CALLS)
  w0, w1 = _threefry(k0_ref[...], k1_ref[...], counters, jnp.zeros_like(counters))
  quarter = lax.broadcasted_iota(jnp.int32, (4, KERNEL_CALLS), 0)  # half q of each call: row q
  word = jnp.where(quarter < 2, w0[None, :], w1[None, :])
  half = jnp.where(quarter % 2 == 0, word & jnp.uint32(0xFFFF), word >> jnp.uint32(16))
  out_ref[...] = (half < jnp.uint32(threshold)).astype(jnp.int8)


def mask_kernel(k0: jax.Array, k1: jax.Array, examples: int, calls: int, threshold: int,
                interpret: bool = False, first=0) -> jax.Array:
  """:func:`keep_mask`'s bits as one GPU kernel: int8 ``[examples, 4, calls]``, 1 where activation ``(b, q, j)``
  (:func:`quarters`) is kept.

  Each program runs :data:`KERNEL_CALLS` Threefry calls and writes their 4,096 mask bytes: nothing is read,
  and the generator's words never reach memory (the traced form writes them, 8 bytes per call, and reads
  them back to compare). Compiling it is one kernel where the traced form is ~130 integer instructions per
  draw, for XLA to fuse. ``calls`` (per example) a multiple of :data:`KERNEL_CALLS`. Triton on GPUs;
  ``interpret``: Pallas's interpreter (for tests). ``first``: the first example's index in the whole batch
  (its counters follow those before it), as :func:`traced_mask`'s.
  """
  words = lambda k: jnp.reshape(k, (1,)).astype(jnp.uint32)  # noqa: E731
  return pl.pallas_call(
      functools.partial(_mask_program, calls=calls, threshold=threshold),
      out_shape=jax.ShapeDtypeStruct((examples, 4, calls), jnp.int8), grid=(examples, calls // KERNEL_CALLS),
      in_specs=[pl.BlockSpec((1,), lambda b, i: (0,))] * 3,
      out_specs=pl.BlockSpec((None, 4, KERNEL_CALLS), lambda b, i: (b, 0, i)), interpret=interpret,
      compiler_params=None if interpret else pallas_triton.CompilerParams(num_warps=4))(
          words(k0), words(k1), jnp.reshape(jnp.asarray(first, jnp.int32), (1,)))


def draw_keep(key: jax.Array, keep_prob: float, shape: tuple) -> tuple[jax.Array, float]:
  """A dropout layer's mask and the keep probability it was drawn with.

  A :data:`PACKED` key: :func:`keep_bytes` (int8, 1 = kept), at the rounded
  probability. Any other key: ``jax.random.bernoulli`` (bool), as
  ``flax.linen.Dropout`` draws it.
  """
  if jax.random.key_impl(key) == PACKED:
    keep_prob = keep_threshold(keep_prob) / (1 << BITS)
    return keep_bytes(key, keep_prob, shape), keep_prob
  return jax.random.bernoulli(key, p=keep_prob, shape=shape), keep_prob


class Dropout(nn.Module):
  """``flax.linen.Dropout`` with the mask of :func:`draw_keep`.

  Named as flax's module would be, it gets the same key: with a threefry,
  philox or rbg key (``execution.dropout_rng``) and float32 activations it
  computes what flax's does, bit for bit; with a :data:`PACKED` key,
  :func:`keep_mask`'s mask, the kept activations divided by its rounded
  keep probability. The division is in float32 whatever the activations'
  dtype: flax divides bf16 activations by the keep probability rounded to
  bf16 (0.9 becomes 0.8984375), which scales every kept activation up by
  0.18 % on average (tested).
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    drawn = self.mask(x.shape, deterministic)
    if drawn is None:
      return x
    keep, keep_prob = drawn
    kept = (x.astype(jnp.promote_types(x.dtype, jnp.float32)) / keep_prob).astype(x.dtype)
    return lax.select(keep.astype(bool), kept, jnp.zeros_like(x))

  def mask(self, shape: tuple, deterministic: bool) -> Optional[tuple[jax.Array, float]]:
    """The mask ``__call__`` would apply to activations of ``shape`` and its keep probability; None where it
    applies none (deterministic, or rate 0). For a kernel that applies it itself (:mod:`vdm.group_norm`)."""
    if deterministic or self.rate == 0.0:
      return None
    if self.rate == 1.0:
      return jnp.zeros(shape, bool), 1.0
    return draw_keep(self.make_rng("dropout"), 1.0 - self.rate, shape)

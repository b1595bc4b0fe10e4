"""GroupNorm and swish as one GPU kernel each way: ``execution.group_norm="pallas"``.

Where the paper's CIFAR-10 step spends its time on an H200 outside the
convolutions (README, Performance): GroupNorm's statistics and their
gradients, ~1,800 small reduction kernels a step, as XLA splits each
reduction in two and differentiates the norm into several more. Here a
program reads an example's ``[H·W, C]`` activations (or its share of the
groups: :class:`Launch`) once to sum them per group, then again (from
L2: 256 KB an example at 32×32×128 bf16) to write
``swish((x + c − μ) / σ · scale + bias)``, ``c`` the example's
conditioning (a ResNet block adds it just before its second norm), added
here rather than in a pass of its own, and the block's dropout mask
applied to the result, rather than by a pass that reads and writes it
again. The input may come in parts whose concatenation is meant (an up
block's input and skip): each part is read where it lies and the
concatenated result written, so the concatenation is never formed, nor
its gradient split. The backward pass likewise takes one kernel: sums of
the incoming gradient per channel, then ``∂/∂x`` (per part) and ``∂/∂c``.
``scale`` and ``bias`` get per-example sums the caller adds up. Compiled
for an H200, the paper's CIFAR-10 step launches 0.76× the kernels and
moves 0.86× the bytes of XLA's norms (docs/performance.md); not yet timed
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
up block's 128 + 128 in 32 groups of 8 too). A program's groups lie in
one part. The loop runs over rows of ``rows`` pixels, a power of two that
divides H·W.
"""

import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton
from jax.sharding import PartitionSpec as P

KERNELS = ("xla", "pallas")  # execution.group_norm
ACCUMULATE = ("elementwise", "rows")  # execution.pallas_accumulate, Launch.accumulate


@dataclasses.dataclass(frozen=True)
class Launch:
  """How the kernels run on a GPU (``execution.pallas_num_warps``, ``pallas_programs``,
  ``pallas_accumulate``); the function is the same whatever they are (tested).

  ``programs``: programs per example, each normalising its share of the
  groups (at least one per part, and at most one per group). ``num_warps``:
  each program's warps. ``chunk``: elements a program reads per loop
  iteration (None: 1,024 a warp, 32 a thread). ``accumulate``: how the
  loops sum their chunks: "elementwise" adds chunks into accumulators of
  a chunk's shape and reduces them once after the loop (Triton's usual
  pattern; more registers); "rows" reduces each chunk over its rows as it
  goes (shuffles and four barriers across the program's threads in every
  iteration; fewer registers, so more programs fit an SM).

  The defaults, 4 programs of 4 warps an example summing elementwise, are
  chosen from registers and occupancy, not yet from a timing: on an H200
  at batch 128 that is 512 programs, three of whose backward programs (168
  registers a thread) an SM holds at once; one 8-warp program an example
  (128 programs, one an SM) keeps half the bytes in flight.
  """
  num_warps: int = 4
  programs: int = 4
  chunk: Optional[int] = None
  accumulate: str = "elementwise"

  def __post_init__(self):
    for name in ("num_warps", "programs") + (("chunk",) if self.chunk is not None else ()):
      value = getattr(self, name)
      if not (isinstance(value, int) and _power_of_two(value)):
        raise ValueError(f"vdm.group_norm.Launch: expected {name} a power of two ≥ 1, got {value!r}")
    if self.num_warps > 32:
      raise ValueError(f"vdm.group_norm.Launch: expected num_warps ≤ 32, got {self.num_warps}")
    if self.accumulate not in ACCUMULATE:
      raise ValueError(f"vdm.group_norm.Launch: expected accumulate one of {ACCUMULATE}, got {self.accumulate!r}")

  @property
  def elements(self) -> int:
    return self.chunk or 1024 * self.num_warps


def launch(kernel: Union[str, Launch]) -> Optional[Launch]:
  """A network's ``group_norm`` field as a :class:`Launch`: None for "xla", the defaults for "pallas"."""
  if isinstance(kernel, Launch):
    return kernel
  if kernel not in KERNELS:
    raise ValueError(f"group_norm: expected one of {KERNELS} or a vdm.group_norm.Launch, got {kernel!r}")
  return Launch() if kernel == "pallas" else None


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


def _rows(pixels: int, channels: int, chunk: int = 8192) -> int:
  """Pixels per loop iteration: the largest power of two ≤ chunk / channels that divides ``pixels``."""
  rows = 1
  while rows * 2 * channels <= chunk and pixels % (rows * 2) == 0:
    rows *= 2
  return rows


def _chunk(ref, i: jax.Array, rows: int, dtype) -> jax.Array:
  """Rows ``i·rows`` to ``(i + 1)·rows`` of a program's ``[P, G_b, S]`` block, in ``dtype``."""
  return ref[pl.ds(pl.multiple_of(i * rows, rows), rows), :, :].astype(dtype)


def _swish_and_grad(u: jax.Array) -> tuple[jax.Array, jax.Array]:
  """swish(u) = u·σ(u) and its derivative σ(u)(1 + u(1 − σ(u)))."""
  s = 1.0 / (1.0 + jnp.exp(-u))
  return u * s, s * (1.0 + u * (1.0 - s))


def _dropout(value: jax.Array, keep_ref, i: jax.Array, rows: int, keep_prob: Optional[float]) -> jax.Array:
  """``value`` (rows ``i·rows`` … of the program's block) where the mask keeps it, divided by
  ``keep_prob``, else 0; untouched without a mask (``keep_prob`` None)."""
  if keep_prob is None:
    return value
  return jnp.where(_chunk(keep_ref, i, rows, jnp.int32) != 0, value / keep_prob, 0.0)


def _summed_loop(steps: int, terms, count: int, shape: tuple, dtype, elementwise: bool) -> tuple:
  """Runs ``terms(i)`` for ``i`` in ``range(steps)`` (it may also write) and sums the ``count`` arrays of
  ``shape`` (a chunk's ``[rows, G_b, S]``) it returns over the iterations and the rows: ``[G_b, S]`` each.
  Elementwise: added up in the chunk's shape and reduced over the rows once, after the loop; else
  reduced over the rows in every iteration (see :class:`Launch`)."""
  def body(i, sums):
    return tuple(total + (term if elementwise else jnp.sum(term, axis=0)) for total, term in zip(sums, terms(i)))

  zeros = tuple(jnp.zeros(shape if elementwise else shape[1:], dtype) for _ in range(count))
  sums = lax.fori_loop(0, steps, body, zeros)
  return tuple(jnp.sum(total, axis=0) for total in sums) if elementwise else sums


def _split(refs, parts: int, shifted: bool, keep_prob: Optional[float]):
  """A kernel's refs: the parts' activations, scale and bias stacked ``[2, G_b, S]`` (one input: one slice
  of a stack of blocks' parameters to materialise for the call, not two), the shift and the mask where
  there are (else None), the rest."""
  refs = list(refs)
  xs, params, refs = refs[:parts], refs[parts], refs[parts + 1:]
  shift = refs.pop(0) if shifted else None
  keep = refs.pop(0) if keep_prob is not None else None
  return xs, params, shift, keep, refs


def _each_part(owners: tuple, body, *refs_per_part) -> None:
  """``body(*refs)`` with the refs of the part that holds this program's groups: program ``j`` (the grid's
  second axis) normalises group block ``j``, which part ``k`` holds if ``lo_k ≤ j < hi_k`` (``owners``)."""
  if len(owners) == 1:
    body(*(refs[0] for refs in refs_per_part))
    return
  j = pl.program_id(1)
  for k, (lo, hi) in enumerate(owners):
    pl.when((j >= lo) & (j < hi))(functools.partial(body, *(refs[k] for refs in refs_per_part)))


def _forward_kernel(*refs, owners, rows, epsilon, swish, shifted, keep_prob, elementwise):
  # Refs, each a program's block of G_b groups (S channels each): each part's x [P, G_b, S] (only the
  # owner's is read), scale and bias stacked [2, G_b, S] and (if shifted) the example's shift [G_b, S];
  # with dropout (keep_prob not None) the example's mask as int8 [P, G_b, S]; out: y [P, G_b, S], mean and
  # rstd [G_b].
  # Arithmetic in scale's dtype (float32).
  x_refs, params_ref, shift_ref, keep_ref, (y_ref, mean_ref, rstd_ref) = _split(
      refs, len(owners), shifted, keep_prob)
  dtype = params_ref.dtype
  shift = 0.0 if shift_ref is None else shift_ref[...].astype(dtype)[None]

  def normalise(x_ref):
    def moments(i):
      x = _chunk(x_ref, i, rows, dtype) + shift
      return x, x * x

    steps, chunk = x_ref.shape[0] // rows, (rows,) + x_ref.shape[1:]
    s1, s2 = _summed_loop(steps, moments, 2, chunk, dtype, elementwise)
    n = x_ref.shape[0] * x_ref.shape[2]
    mean = jnp.sum(s1, axis=1) / n  # [G_b]
    var = jnp.maximum(jnp.sum(s2, axis=1) / n - mean * mean, 0.0)  # as flax: E[x²] − E[x]², clipped at 0
    rstd = lax.rsqrt(var + epsilon)
    mul = params_ref[0, :, :] * rstd[:, None]  # scale / σ, [G_b, S]
    bias = params_ref[1, :, :]

    def write(i, carry):
      u = (_chunk(x_ref, i, rows, dtype) + shift - mean[None, :, None]) * mul[None] + bias[None]
      y = _dropout(_swish_and_grad(u)[0] if swish else u, keep_ref, i, rows, keep_prob)
      y_ref[pl.ds(pl.multiple_of(i * rows, rows), rows), :, :] = y.astype(y_ref.dtype)
      return carry

    lax.fori_loop(0, steps, write, 0)
    mean_ref[...] = mean
    rstd_ref[...] = rstd

  _each_part(owners, normalise, x_refs)


def _backward_kernel(*refs, owners, rows, swish, shifted, keep_prob, elementwise):
  # With x̂ = (x + shift − μ)·r, u = x̂·scale + bias, y = swish(u): du = dy·swish'(u), ∂bias = Σ du,
  # ∂scale = Σ du·x̂, ∂x = r·(du·scale − mean_g(du·scale) − x̂·mean_g(du·scale·x̂)) (means over the n values
  # of a group) and ∂shift = Σ ∂x over the pixels. With dropout, dy is first masked and divided as y was.
  # Refs (blocks as in the forward kernel): its inputs, mean and rstd, dy [P, G_b, S]; out: each part's
  # ∂x [P, G_b, S] (only the owner's written), then (if shifted) ∂shift, and ∂scale, ∂bias stacked
  # [2, G_b, S] (the example's).
  x_refs, params_ref, shift_ref, keep_ref, refs = _split(refs, len(owners), shifted, keep_prob)
  (mean_ref, rstd_ref, dy_ref), refs = refs[:3], refs[3:]
  dx_refs, refs = refs[:len(owners)], refs[len(owners):]
  dshift_ref, dparams_ref = refs if shifted else (None, refs[0])
  dtype = params_ref.dtype
  mean = mean_ref[...][None, :, None]  # [1, G_b, 1]
  rstd = rstd_ref[...][None, :, None]
  scale, bias = params_ref[0, :, :], params_ref[1, :, :]  # [G_b, S]
  shift = 0.0 if shift_ref is None else shift_ref[...].astype(dtype)[None]

  def differentiate(x_ref, dx_ref):
    def grads(i):
      x_hat = (_chunk(x_ref, i, rows, dtype) + shift - mean) * rstd
      dy = _dropout(_chunk(dy_ref, i, rows, dtype), keep_ref, i, rows, keep_prob)
      du = dy * _swish_and_grad(x_hat * scale[None] + bias[None])[1] if swish else dy
      return x_hat, du

    def sums(i):
      x_hat, du = grads(i)
      return du, du * x_hat

    steps, chunk = x_ref.shape[0] // rows, (rows,) + x_ref.shape[1:]
    dbias, dscale = _summed_loop(steps, sums, 2, chunk, dtype, elementwise)
    n = x_ref.shape[0] * x_ref.shape[2]
    mean_d = (jnp.sum(dbias * scale, axis=1) / n)[None, :, None]  # mean_g(du·scale)
    mean_dx = (jnp.sum(dscale * scale, axis=1) / n)[None, :, None]  # mean_g(du·scale·x̂)

    def write(i):
      x_hat, du = grads(i)
      dx = rstd * (du * scale[None] - mean_d - x_hat * mean_dx)
      dx_ref[pl.ds(pl.multiple_of(i * rows, rows), rows), :, :] = dx.astype(dx_ref.dtype)
      return (dx,) if shifted else ()

    dshift = _summed_loop(steps, write, int(shifted), chunk, dtype, elementwise)
    if shifted:
      dshift_ref[...] = dshift[0].astype(dshift_ref.dtype)
    dparams_ref[0, :, :] = dscale
    dparams_ref[1, :, :] = dbias

  _each_part(owners, differentiate, x_refs, dx_refs)


def _spec(shape: tuple, axis: int, block: int, batched: bool = True, first: Optional[int] = None) -> pl.BlockSpec:
  """A program's block of an array whose ``axis`` holds groups: program ``(b, j)`` gets example ``b`` (if
  ``batched``) and group block ``j``. A part's array (``first``: its first group in the whole) gives
  program ``j`` its block ``j − first / block``, clipped to its own: programs whose groups another part
  holds get a block of this part they leave alone."""
  shape = tuple(shape)

  def index(b, j):
    at = [0] * len(shape)
    at[axis] = j if first is None else jnp.clip(j - first // block, 0, shape[axis] // block - 1)
    if batched:
      at[0] = b
    return tuple(at)

  return pl.BlockSpec(tuple(None if batched and d == 0 else block if d == axis else n
                            for d, n in enumerate(shape)), index)


def _call(kernel, ins, outs, programs: int, launch: Launch, interpret: bool):
  """``programs`` programs per example. ``ins`` and ``outs`` are (array or ShapeDtypeStruct, BlockSpec)
  pairs (:func:`_spec`).

  Triton where the program is lowered for a GPU; Pallas's interpreter on other platforms or if ``interpret``.
  Traced under a mesh whose ``data`` axis has several devices (:func:`vdm.sharding.on_mesh`), each device
  runs the kernels on its share of the batch (XLA cannot split a custom call itself: every device would
  normalise the whole batch).
  """
  batched = [spec.block_shape[0] is None for _, spec in ins]  # per-example arrays; the rest (scale, bias) whole
  outs, out_specs = tuple(o for o, _ in outs), [spec for _, spec in outs]
  ins, in_specs = [x for x, _ in ins], [spec for _, spec in ins]
  devices = _data_devices(outs[0].shape[0])
  batch = outs[0].shape[0] // devices
  local = tuple(jax.ShapeDtypeStruct((o.shape[0] // devices,) + o.shape[1:], o.dtype) for o in outs)
  call = functools.partial(pl.pallas_call, kernel, out_shape=local, grid=(batch, programs), in_specs=in_specs,
                           out_specs=out_specs)
  interpreted = lambda *args: call(interpret=True)(*args)  # noqa: E731
  if interpret:
    run = interpreted
  else:
    params = pallas_triton.CompilerParams(num_warps=launch.num_warps)
    triton = lambda *args: call(compiler_params=params)(*args)  # noqa: E731
    run = lambda *args: lax.platform_dependent(*args, cuda=triton, rocm=triton, default=interpreted)  # noqa: E731
  if devices > 1:
    run = jax.shard_map(run, mesh=jax.sharding.get_abstract_mesh(), check_vma=False,
                        in_specs=tuple(P("data") if b else P() for b in batched), out_specs=(P("data"),) * len(outs))
  return run(*ins)


def _data_devices(batch: int) -> int:
  """Devices of the ``data`` axis of the mesh being traced under, if the batch splits over them; else 1."""
  devices = dict(jax.sharding.get_abstract_mesh().shape).get("data", 1)
  return devices if batch % devices == 0 else 1


def group_norm(x: Union[jax.Array, Sequence[jax.Array]], scale: jax.Array, bias: jax.Array, groups: int,
               swish: bool = True, epsilon: float = 1e-6, dtype: Any = None, *, shift: Optional[jax.Array] = None,
               keep: Optional[jax.Array] = None, keep_prob: float = 1.0, launch: Optional[Launch] = None,
               interpret: bool = False) -> jax.Array:
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
      ``keep`` (``[B, H, W, C]`` bool, or int8 with 1 for kept, e.g.
      :meth:`vdm.dropout.Dropout.mask`)
      the result divided by ``keep_prob`` (in float32), elsewhere 0; the
      backward kernel masks the incoming gradient alike. None: no dropout.
    launch: how the kernels run on a GPU (:class:`Launch`; None: its
      defaults); the same function whatever it is.
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
  return _group_norm(parts, shift, scale, bias, keep, groups, swish, epsilon, dtype, keep_prob, launch or Launch(),
                     interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10, 11))
def _group_norm(parts, shift, scale, bias, keep, groups, swish, epsilon, dtype, keep_prob, launch, interpret):
  return _forward(parts, shift, scale, bias, keep, groups, swish, epsilon, dtype, keep_prob, launch, interpret)[0]


class _Layout(NamedTuple):
  """The parts as the kernels see them: the whole ``[B, P, G, S]`` (P = H·W pixels, S = C / G), ``block``
  groups a program, each part's first group and its group count, and pixels per loop iteration."""
  shape: tuple[int, int, int, int]
  block: int
  spans: tuple[tuple[int, int], ...]
  rows: int

  @property
  def programs(self) -> int:
    return self.shape[2] // self.block

  @property
  def owners(self) -> tuple[tuple[int, int], ...]:
    """Each part's group blocks: [lo, hi) of the programs' second index."""
    return tuple((first // self.block, (first + count) // self.block) for first, count in self.spans)


def _layout(parts: tuple, groups: int, launch: Launch) -> _Layout:
  widths = [part.shape[-1] for part in parts]
  if not supported(widths, groups):
    what = f"{sum(widths)} channels" if len(widths) == 1 else f"parts of {widths} channels"
    raise ValueError(f"execution.group_norm='pallas': expected groups and channels per group powers of two"
                     f"{'' if len(widths) == 1 else ', each part whole groups, a power of two of them'}, "
                     f"got {what} in {groups} groups")
  b, h, w, _ = parts[0].shape
  size = sum(widths) // groups
  spans = tuple((sum(widths[:j]) // size, c // size) for j, c in enumerate(widths))
  # Group counts are powers of two: a block no larger than the smallest part lies in one part.
  block = max(1, min([groups // launch.programs] + [count for _, count in spans]))
  return _Layout((b, h * w, groups, size), block, spans, _rows(h * w, block * size, launch.elements))


def _inputs(parts, scale, bias, shift, keep, layout: _Layout) -> tuple:
  """Both kernels' first inputs with their blocks: the parts, scale and bias, the shift and the mask where
  there are."""
  b, pixels, g, s = layout.shape
  views = tuple((part.reshape(b, pixels, count, s), _spec((b, pixels, count, s), 2, layout.block, first=first))
                for part, (first, count) in zip(parts, layout.spans))
  params = jnp.stack([scale.reshape(g, s), bias.reshape(g, s)])  # [2, G, S]
  params = ((params, _spec(params.shape, 1, layout.block, batched=False)),)
  return (views + params
          + (() if shift is None else ((shift.reshape(b, g, s), _spec((b, g, s), 1, layout.block)),))
          + (() if keep is None else ((keep.reshape(layout.shape), _spec(layout.shape, 2, layout.block)),)))


def _forward(parts, shift, scale, bias, keep, groups, swish, epsilon, dtype, keep_prob, launch, interpret):
  layout = _layout(parts, groups, launch)
  b, _, g, s = layout.shape
  kernel = functools.partial(_forward_kernel, owners=layout.owners, rows=layout.rows, epsilon=epsilon,
                             swish=swish, shifted=shift is not None, keep_prob=keep_prob,
                             elementwise=launch.accumulate == "elementwise")
  stat = (jax.ShapeDtypeStruct((b, g), scale.dtype), _spec((b, g), 1, layout.block))
  outs = ((jax.ShapeDtypeStruct(layout.shape, dtype or parts[0].dtype), _spec(layout.shape, 2, layout.block)),
          stat, stat)
  y, mean, rstd = _call(kernel, _inputs(parts, scale, bias, shift, keep, layout), outs, layout.programs, launch,
                        interpret)
  return y.reshape(parts[0].shape[:-1] + (g * s,)), (parts, shift, scale, bias, keep, mean, rstd)


def _backward(groups, swish, epsilon, dtype, keep_prob, launch, interpret, residuals, dy):
  parts, shift, scale, bias, keep, mean, rstd = residuals
  layout = _layout(parts, groups, launch)
  b, pixels, g, s = layout.shape
  kernel = functools.partial(_backward_kernel, owners=layout.owners, rows=layout.rows, swish=swish,
                             shifted=shift is not None, keep_prob=keep_prob,
                             elementwise=launch.accumulate == "elementwise")
  dxs = tuple((jax.ShapeDtypeStruct((b, pixels, count, s), part.dtype),
               _spec((b, pixels, count, s), 2, layout.block, first=first))
              for part, (first, count) in zip(parts, layout.spans))
  # Per example: ∂shift (if shifted), and ∂scale and ∂bias stacked (one sum over the batch for both).
  shift_sums = () if shift is None else (
      (jax.ShapeDtypeStruct((b, g, s), shift.dtype), _spec((b, g, s), 1, layout.block)),)
  sums = shift_sums + ((jax.ShapeDtypeStruct((b, 2, g, s), scale.dtype), _spec((b, 2, g, s), 2, layout.block)),)
  stat_spec = _spec((b, g), 1, layout.block)
  ins = _inputs(parts, scale, bias, shift, keep, layout) + (
      (mean, stat_spec), (rstd, stat_spec), (dy.reshape(layout.shape), _spec(layout.shape, 2, layout.block)))
  *dxs, dparams = _call(kernel, ins, dxs + sums, layout.programs, launch, interpret)
  dshift = None if shift is None else dxs.pop().reshape(shift.shape)
  dscale, dbias = dparams.sum(0)
  return (tuple(dx.reshape(part.shape) for dx, part in zip(dxs, parts)), dshift,
          dscale.reshape(scale.shape), dbias.reshape(bias.shape), None)


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
  launch: Launch = Launch()

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
                      keep=keep, keep_prob=keep_prob, launch=self.launch)


# execution.group_norm="auto": the kernels where they were checked to run, XLA's norm elsewhere.

def _reference(parts, scale, bias, groups: int, shift, keep, keep_prob: float, epsilon: float) -> jax.Array:
  """``dropout(swish(GroupNorm(concat(parts) + shift)))`` in plain JAX, flax's variance (E[x²] − E[x]²)."""
  x = jnp.concatenate(parts, axis=-1).astype(scale.dtype) + shift[:, None, None, :]
  b, h, w, c = x.shape
  xg = x.reshape(b, h * w, groups, c // groups)
  mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
  var = jnp.maximum(jnp.mean(xg * xg, axis=(1, 3), keepdims=True) - mean * mean, 0.0)
  y = ((xg - mean) * lax.rsqrt(var + epsilon)).reshape(x.shape) * scale + bias
  return jnp.where(keep, nn.swish(y) / keep_prob, 0.0)


def max_error(launch: Launch = Launch(), interpret: bool = False) -> float:
  """The kernels against :func:`_reference` on this machine's default device, in float32: the largest
  difference of value and gradients (of every input), relative to each one's largest magnitude.

  Two small cases between them use every path of the kernels: an up block's two parts (as 32 groups of 4
  channels) and one part of 64 channels in 16 groups, each with a shift and a dropout mask.
  """
  worst = 0.0
  for widths, groups in (((64, 64), 32), ((64,), 16)):
    keys = jax.random.split(jax.random.PRNGKey(len(widths)), len(widths) + 6)
    c = sum(widths)
    parts = tuple(jax.random.normal(k, (2, 8, 8, w)) * 2.0 + 0.5 for k, w in zip(keys, widths))
    scale = 1.0 + 0.3 * jax.random.normal(keys[-6], (c,))
    bias = 0.3 * jax.random.normal(keys[-5], (c,))
    shift = jax.random.normal(keys[-4], (2, c))
    keep = jax.random.bernoulli(keys[-3], 0.9, (2, 8, 8, c))
    dy = jax.random.normal(keys[-2], (2, 8, 8, c))

    def kernels(parts, scale, bias, shift):
      return group_norm(parts, scale, bias, groups, shift=shift, keep=keep, keep_prob=0.9, launch=launch,
                        interpret=interpret)

    def reference(parts, scale, bias, shift):
      return _reference(parts, scale, bias, groups, shift, keep, 0.9, 1e-6)

    got, want = (jax.vjp(f, parts, scale, bias, shift) for f in (kernels, reference))
    pairs = [(got[0], want[0])] + list(zip(jax.tree.leaves(got[1](dy)), jax.tree.leaves(want[1](dy))))
    for a, b in pairs:
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
  return worst


TOLERANCE = 1e-4  # float32: the kernels sum in another order than XLA (measured on CPU: ~1e-7)


@functools.cache
def _checked(launch: Launch) -> Optional[str]:
  device = jax.devices()[0].device_kind
  try:
    error = max_error(launch)
  except Exception as e:  # a lowering or launch failure: this GPU's Triton does not take them
    return f"the Pallas GroupNorm kernels failed on {device}: {type(e).__name__}: {str(e)[:300]}"
  if not error <= TOLERANCE:
    return (f"the Pallas GroupNorm kernels differ from the reference on {device} by {error:.2g} "
            f"(relative, tolerance {TOLERANCE:g})")
  return None


def unavailable(launch: Launch = Launch()) -> Optional[str]:
  """Why ``execution.group_norm="auto"`` uses XLA's norm here, or None where it uses the kernels.

  The kernels are for GPUs: elsewhere they would run in Pallas's
  interpreter. With several devices each runs them on its share of the
  batch (:func:`_call`, in the programs of :mod:`vdm.train_step`,
  :mod:`vdm.evaluation` and :mod:`vdm.sampling`). On a GPU they run once on
  small inputs against the reference first (:func:`max_error`, a second or
  two, once per process and launch, on its first device), so a GPU whose
  Triton does not take them still trains.
  """
  if jax.default_backend() != "gpu":
    return f"the default backend is {jax.default_backend()!r}, not a GPU"
  if isinstance(jnp.zeros(()), jax.core.Tracer):
    return "the model is built inside a traced function, where the kernels cannot be checked"
  return _checked(launch)

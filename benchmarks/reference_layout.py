"""Checkpoints in the 2022 reference code's on-disk layout, for tests and benchmarks.

clu's ``Checkpoint`` writes ``<prefix>.flax``: ``flax.serialization.to_bytes``
of the reference's TrainState (``step``, ``params``, ``ema_params`` and an
AdamW ``opt_state``), parameters under the module names and shapes of
google-research/vdm's ``model_vdm.py``. Written here from those names and
shapes, with random values.
"""

import os

import flax
import jax
import numpy as np
import optax


@flax.struct.dataclass
class ReferenceTrainState:  # the fields the reference's TrainState serialises
  step: int
  params: dict
  ema_params: dict
  opt_state: optax.OptState


def parameters(seed, channels, num_blocks, image_channels=3, exponents=(6, 7), attention=False,
               w=-18.0, b=-13.0, shapes_only=False):
  """Random parameters under the reference's names; ``w`` < 0 exercises its |w|.

  ``shapes_only``: zeros that take no memory (``np.broadcast_to``), for checking names and shapes.
  """
  rng = np.random.default_rng(seed)

  def draw(std, shape, mean=0.0):
    if shapes_only:
      return np.broadcast_to(np.float32(0), shape)
    return (mean + rng.normal(0, std, shape)).astype(np.float32)

  def dense(n_in, n_out, bias=True, scale=1.0):
    out = {"kernel": draw(scale / np.sqrt(n_in), (n_in, n_out))}
    if bias:
      out["bias"] = draw(0.1, (n_out,))
    return out

  def conv(n_in, n_out, scale=1.0):
    return {"kernel": draw(scale / np.sqrt(9 * n_in), (3, 3, n_in, n_out)), "bias": draw(0.1, (n_out,))}

  def norm(n):
    return {"scale": draw(0.1, (n,), mean=1.0), "bias": draw(0.1, (n,))}

  emb = 4 * channels

  def block(n_in):
    out = {"GroupNorm_0": norm(n_in), "conv1": conv(n_in, channels), "cond_proj": dense(emb, channels, False),
           "GroupNorm_1": norm(channels), "conv2": conv(channels, channels, 0.5)}
    if n_in != channels:
      out["nin_shortcut"] = dense(n_in, channels)
    return out

  def attn():
    return {"GroupNorm_0": norm(channels), **{n: dense(channels, channels) for n in ("q", "k", "v")},
            "proj_out": dense(channels, channels, scale=0.5)}

  sm = {"dense0": dense(channels + 1, emb), "dense1": dense(emb, emb),
        "conv_in": conv(image_channels * (1 + 2 * len(exponents)), channels),
        "mid.block_1": block(channels), "mid.attn_1": attn(), "mid.block_2": block(channels),
        "GroupNorm_0": norm(channels), "conv_out": conv(channels, image_channels, 0.5)}
  for i in range(num_blocks):
    sm[f"down.block_{i}"] = block(channels)
    if attention:
      sm[f"down.attn_{i}"] = attn()
  for i in range(num_blocks + 1):
    sm[f"up.block_{i}"] = block(2 * channels)
    if attention:
      sm[f"up.attn_{i}"] = attn()
  return {"score_model": sm, "gamma": {"w": np.array([w], np.float32), "b": np.array([b], np.float32)}}


def write(folder, ema_params, step=12345):
  """<folder>/checkpoints-0.flax as clu's Checkpoint writes it, beside stand-ins for TensorFlow's files."""
  os.makedirs(folder, exist_ok=True)
  params = jax.tree.map(lambda x: x + np.float32(0.01), ema_params)  # raw ≠ EMA: the EMA must be used

  def decay_mask(tree):
    flat = flax.traverse_util.flatten_dict(tree)
    return flax.traverse_util.unflatten_dict({k: k[-1] != "bias" for k in flat})

  opt = optax.adamw(2e-4, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01, mask=decay_mask)
  state = ReferenceTrainState(step=step, params=params, ema_params=ema_params, opt_state=opt.init(params))
  prefix = os.path.join(folder, "checkpoints-0")
  with open(prefix + ".flax", "wb") as f:
    f.write(flax.serialization.to_bytes(state))
  for suffix in (".index", ".data-00000-of-00001"):
    with open(prefix + suffix, "wb") as f:
      f.write(b"TensorFlow's part; vdm does not read it")
  return prefix

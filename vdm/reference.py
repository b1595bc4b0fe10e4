"""Checkpoints of the 2022 reference code (google-research/vdm), read without TensorFlow.

The paper's authors released two trained CIFAR-10 models::

    gs://gresearch/vdm/cifar10/checkpoint-final/checkpoints-0        configs/cifar10.py, 2.637 bpd
    gs://gresearch/vdm/cifar10/aug-checkpoint-final/checkpoints-0    configs/cifar10_aug_released.py, 2.522

clu's ``Checkpoint`` wrote them: TensorFlow's own files plus ``<prefix>.flax``,
the MessagePack of the reference's TrainState (``step``, ``params``,
``ema_params``, ``opt_state``). Only the ``.flax`` file is read.

:func:`to_params` puts the reference's arrays where this project's network
keeps the same weights; the network then computes the reference's function
(same time embedding, block order, GroupNorm groups with
``model.network.norm_groups = 32``, attention, skip order, Fourier features,
base measure ``z + out``), and γ(t) = b + |w| t becomes ``learned_linear``
with γ_0 = b, γ_1 = b + |w|. Exact up to float32 rounding of γ_1 − γ_0
(≤ 1 ulp of γ_1, 5e-7). One difference is mapped rather than copied: the
reference's first dense layer takes a conditioning scalar after the time
embedding (one more row of 4·channels weights), 0 for every CIFAR-10 image
and, in the augmented model, 1 for an augmented one. Without augmentation
the row is dropped (its input was always 0). With ``data.augment`` this
project conditions on the augmentation's code (0 = identity, one-hot): code
0 gets a zero row and codes 1–7 the reference's row, so every augmented
image is conditioned as the reference conditioned it. Evaluation and
sampling are exact; resuming training is not the reference's run (its
optimiser state is not carried over, and it drew the identity with
probability 1/4, not 1/8).
"""

import re
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from vdm import config as config_lib
from vdm import networks, train_step
from vdm.checkpoints import CheckpointError
from vdm.config import ConfigError

SUFFIX = ".flax"

# Our ResNet block's parameters ← the reference's names for them.
_RESNET = {"GroupNorm_0": "GroupNorm_0", "Conv_0": "conv1", "Dense_0": "cond_proj", "GroupNorm_1": "GroupNorm_1",
           "Conv_1": "conv2", "skip": "nin_shortcut"}
_ATTENTION = {"query": "q", "key": "k", "value": "v", "out": "proj_out"}
_TOP = {"temb_0": "dense0", "temb_1": "dense1", "conv_in": "conv_in", "conv_out": "conv_out",
        "norm_out": "GroupNorm_0"}


def find(path: str) -> Optional[epath.Path]:
  """The ``.flax`` file of a reference checkpoint at ``path``, or None if ``path`` holds none.

  ``path``: the checkpoint's prefix (``…/checkpoints-0``), its ``.flax``
  file, or the folder holding it (the highest-numbered one there); local or
  ``gs://`` (which needs TensorFlow, the ``tfds`` extra, or gcsfs).
  """
  try:
    p = epath.Path(path)
    if str(path).endswith(SUFFIX):
      if not p.exists():
        raise FileNotFoundError(f"{path}: no such file")
      return p
    prefixed = epath.Path(str(path) + SUFFIX)
    if prefixed.exists():
      return prefixed
    if p.is_dir():
      found = sorted(p.glob("*" + SUFFIX), key=lambda f: (_number(f.name), f.name))
      return found[-1] if found else None
  except (ImportError, ModuleNotFoundError, AttributeError) as e:  # epath without a gs:// backend
    raise FileNotFoundError(f"{path}: cannot be read here ({e}); gs:// paths need TensorFlow "
                            "(pip install -e '.[tfds]') or gcsfs") from e
  return None


def _number(name: str) -> int:
  match = re.search(r"(\d+)" + re.escape(SUFFIX) + "$", name)
  return int(match.group(1)) if match else -1


def read(file: epath.Path) -> dict:
  """The reference TrainState as nested dicts of numpy arrays.

  Raises CheckpointError when the file is not a complete MessagePack of one.
  """
  try:
    data = file.read_bytes()
  except OSError as e:
    raise FileNotFoundError(f"{file}: cannot be read ({e.strerror or e})") from e
  try:
    state = flax.serialization.msgpack_restore(data)
  except Exception as e:  # noqa: BLE001: msgpack's errors for truncated or foreign data vary
    raise CheckpointError(f"{file}: not a readable google-research/vdm checkpoint ({type(e).__name__}: "
                          f"{e}); is the file complete?") from e
  if not isinstance(state, dict) or not isinstance(state.get("ema_params"), dict) or "step" not in state:
    keys = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise CheckpointError(f"{file}: not a google-research/vdm TrainState (expected step, params, ema_params, "
                          f"opt_state; found {keys})")
  return state


def to_params(reference: dict, config: ml_collections.ConfigDict, image_shape) -> dict:
  """This project's parameters for ``config`` from the reference's (``state["ema_params"]``).

  Raises CheckpointError naming the first parameter whose shape does not fit
  the config, or one the config's network has no place for.
  """
  if config.model.prediction != "eps":
    raise ConfigError(f"config.model.prediction: the reference's network predicts ε; expected 'eps', got "
                      f"{config.model.prediction!r}")
  flat = {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(reference).items()}
  schedule = _schedule(flat, config)
  unrolled = ml_collections.ConfigDict(config.to_dict())
  unrolled.model.network.scan_blocks = False
  like = jax.eval_shape(lambda: train_step.create_train_state(
      unrolled, config_lib.build_model(unrolled), config_lib.build_optimizer(unrolled), image_shape)).params
  network, used = {}, set()
  ours = flax.traverse_util.flatten_dict(like["network"])
  for key in sorted(ours, key=lambda k: (k[:-1], k[-1] != "kernel")):  # a layer's kernel first: both widths
    leaf = ours[key]
    name = "score_model/" + "/".join(_reference_key(key))
    want = _reference_shape(key, leaf.shape)
    if name not in flat:
      raise CheckpointError(f"the checkpoint has no {name} {want}, which config.model.network needs (its "
                            f"{'/'.join(key)}): check num_blocks, mid_attention and attention_everywhere")
    if flat[name].shape != want:
      raise CheckpointError(f"{name}: the checkpoint's shape is {flat[name].shape}, config.model.network "
                            f"needs {want}")
    network[key] = _convert(key, flat[name], leaf.shape)
    used.add(name)
  extra = sorted(n for n in flat if n.startswith("score_model/") and n not in used)
  if extra:
    raise CheckpointError(f"the checkpoint's {extra[0]} {flat[extra[0]].shape} has no place in config.model."
                          f"network ({len(extra)} such parameters): check num_blocks, mid_attention and "
                          f"attention_everywhere")
  network = flax.traverse_util.unflatten_dict(network)
  if config.model.network.scan_blocks:
    network = networks.stack_params(network, config.model.network.num_blocks)
  return {"network": network, "schedule": schedule}


def _schedule(flat: dict, config: ml_collections.ConfigDict) -> dict:
  name = config.model.schedule.name
  learned = {n for n in flat if n.startswith("gamma/")}
  if learned == {"gamma/w", "gamma/b"}:
    if name != "learned_linear":
      raise ConfigError(f"config.model.schedule.name: the checkpoint learns γ(t) = b + |w| t; expected "
                        f"'learned_linear', got {name!r}")
    b, w = float(flat["gamma/b"].reshape(-1)[0]), float(flat["gamma/w"].reshape(-1)[0])
    return {"gamma_min": np.float32(b), "gamma_max": np.float32(b + abs(w))}
  if learned:
    raise CheckpointError(f"the checkpoint's γ schedule ({', '.join(sorted(learned))}) is the reference's "
                          "learnable_nnet, which vdm does not map (no such checkpoint was released)")
  if name != "fixed_linear":
    raise ConfigError(f"config.model.schedule.name: the checkpoint's γ is fixed; expected 'fixed_linear', got "
                      f"{name!r}")
  return {}


def _reference_key(key: tuple) -> list:
  """Our unrolled parameter path → the reference's (below ``score_model``)."""
  head, rest = key[0], list(key[1:])
  if head in _TOP:
    return [_TOP[head]] + rest
  layer, part = head, rest[0]
  if layer == "mid_0":
    block = "mid.block_1" if part == "resnet" else "mid.attn_1"
  elif layer == "mid_1":
    block = "mid.block_2"
  else:
    stack, index = layer.split("_")
    block = f"{stack}.{'block' if part == 'resnet' else 'attn'}_{index}"
  if part == "resnet":
    return [block, _RESNET[rest[1]]] + rest[2:]
  if rest[1] == "GroupNorm_0":
    return [block] + rest[1:]
  return [block, _ATTENTION[rest[2]], rest[3]]  # attn/MultiHeadDotProductAttention_0/<q|k|v|out>/<leaf>


def _reference_shape(key: tuple, shape: tuple) -> tuple:
  """The shape the reference gives the parameter that ours of ``shape`` comes from."""
  if key == ("temb_0", "kernel"):
    channels = shape[1] // 4
    return (channels + 1, shape[1])  # the time embedding, then the conditioning scalar
  if "MultiHeadDotProductAttention_0" in key:
    return (int(np.prod(shape)),) if key[-1] == "bias" else (int(np.prod(shape)) // shape[-1], shape[-1])
  return tuple(shape)


def _convert(key: tuple, array: np.ndarray, shape: tuple) -> np.ndarray:
  array = np.asarray(array, np.float32)
  if key == ("temb_0", "kernel"):
    channels = array.shape[0] - 1
    codes = shape[0] - channels  # 0, or one row per augmentation code
    if not codes:
      return array[:channels]  # the conditioning scalar was 0 for every image
    rows = np.repeat(array[channels:], codes, axis=0)
    rows[0] = 0.0  # code 0, the identity: the reference's scalar 0
    return np.concatenate([array[:channels], rows])
  return array.reshape(shape)


def load(file: epath.Path, config: ml_collections.ConfigDict, image_shape) -> tuple[dict, int]:
  """(our parameters from its EMA parameters, its step) of the reference checkpoint ``file`` (see :func:`find`)."""
  state = read(file)
  params = to_params(state["ema_params"], config, image_shape)
  return jax.tree.map(jnp.asarray, params), int(np.asarray(state["step"]))

"""Orbax save/restore of everything needed to resume, plus the run's config.

Each checkpoint ``<workdir>/checkpoints/<step>/`` holds the whole TrainState
(step, params, EMA params, optimiser state, PRNG key) and the config as JSON,
so it can be loaded alone. Orbax writes to a temporary folder and renames it
when complete; half-written folders are never listed as checkpoints.
"""

import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint cannot be used: unreadable, or made by a different model."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(directory: str, keep: Optional[int] = None, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "config", "metadata"))


def _to_saveable(state: Any) -> Any:
  # Typed PRNG keys are stored as their raw uint32 data.
  return state.replace(key=jax.random.key_data(state.key))


def save(mngr: ocp.CheckpointManager, state: Any, config: ml_collections.ConfigDict,
         metadata: Optional[dict] = None) -> None:
  """Saves ``state`` at its step, with the config and ``metadata`` (e.g. image_shape) as JSON."""
  step = int(jax.device_get(state.step))
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_to_saveable(state)),
                                          config=ocp.args.JsonSave(config.to_dict()),
                                          metadata=ocp.args.JsonSave(metadata or {})), force=True)
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, like: Any, step: Optional[int] = None,
            sharding: Optional[jax.sharding.Sharding] = None) -> Any:
  """Restores the state at ``step`` (default: latest) into the structure of ``like``.

  ``sharding`` places every array (e.g. replicated over a mesh); default: the
  first device. Either way the checkpoint may come from another topology
  (say, 8 GPUs or 2 hosts) than the one restoring it.
  """
  step = mngr.latest_step() if step is None else step
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(_to_saveable, like)  # works for concrete and abstract ``like``
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  except Exception as e:  # orbax raises many types for unreadable or mismatched folders
    raise CheckpointError(f"checkpoint {mngr.directory}/{step} could not be restored: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
  state = restored["state"]
  return state.replace(key=jax.random.wrap_key_data(state.key))


def restore_config(mngr: ocp.CheckpointManager, step: Optional[int] = None
                   ) -> tuple[ml_collections.ConfigDict, dict]:
  """The config and metadata saved with a checkpoint."""
  step = mngr.latest_step() if step is None else step
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                          metadata=ocp.args.JsonRestore()))
  except Exception as e:
    raise CheckpointError(f"checkpoint {mngr.directory}/{step} has no readable config: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
  config = ml_collections.ConfigDict(restored["config"])
  for section, fields in LATER_FIELDS.items():  # checkpoints written before these fields existed
    for name, value in fields.items():
      if section in config and name not in config[section]:
        config[section][name] = value
  return config, dict(restored["metadata"] or {})


# Config fields added after checkpoints were first written, with the value
# that reproduces what those checkpoints were trained with.
LATER_FIELDS = {
    "model": {"conv_grad": "xla", "matmul_precision": "default", "remat_policy": "full"},
    "data": {"augment": False},
    "eval": {"full_precision": True},
}

# Fields that change how the network is computed, not what it computes or
# its parameters: a checkpoint may be resumed with other values.
EXECUTION_FIELDS = ("remat", "remat_policy", "dtype", "matmul_precision", "conv_grad")


def check_compatible(mngr: ocp.CheckpointManager, step: Optional[int], config: ml_collections.ConfigDict,
                     image_shape) -> None:
  """Refuses a checkpoint whose model config or image shape differs from the run's.

  Raises CheckpointError listing the differing fields.
  """
  saved, metadata = restore_config(mngr, step)
  want, have = config.model.to_dict(), saved.model.to_dict()
  diffs = [f"model.{k}: checkpoint {have.get(k)!r}, config {want.get(k)!r}"
           for k in sorted(set(want) | set(have))
           if k not in EXECUTION_FIELDS and _plain(want.get(k)) != _plain(have.get(k))]
  if bool(saved.data.get("augment", False)) != bool(config.data.augment):
    diffs.append(f"data.augment: checkpoint {saved.data.get('augment', False)!r}, config {config.data.augment!r}")
  saved_shape = tuple(metadata.get("image_shape", ()))
  if saved_shape and saved_shape != tuple(image_shape):
    diffs.append(f"image shape: checkpoint {saved_shape}, data {tuple(image_shape)}")
  if diffs:
    raise CheckpointError(f"checkpoint {mngr.directory} was made by a different model ("
                          + "; ".join(diffs) + "); use another --workdir, or pass "
                          "--allow_config_mismatch to load it anyway")


def _plain(value):
  return list(value) if isinstance(value, (tuple, list)) else value


def resolve(path: str) -> tuple[str, Optional[int]]:
  """Maps a workdir, its checkpoints/ folder or one step's folder to (dir, step).

  Raises FileNotFoundError with what was looked for when nothing is there.
  """
  path = os.path.abspath(path)
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit() and os.path.isdir(path):
    return os.path.dirname(path), int(base)
  for candidate in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(candidate) and any(d.isdigit() for d in os.listdir(candidate)):
      return candidate, None
  raise FileNotFoundError(f"no checkpoint under {path!r} (expected <workdir>/checkpoints/<step>/)")

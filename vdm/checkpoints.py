"""Orbax save/restore of everything needed to resume, plus the run's config.

Each checkpoint ``<workdir>/checkpoints/<step>/`` holds the whole TrainState
(step, params, EMA params, optimiser state, PRNG key) and the config as JSON,
so it can be loaded alone. Orbax writes to a temporary folder and renames it
when complete; half-written folders are never listed as checkpoints.
"""

import contextlib
import copy
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging


class CheckpointError(ValueError):
  """A checkpoint cannot be used: unreadable, or made by a different model."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(directory: str, keep: Optional[int] = None, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep, create=not read_only,
                                         read_only=read_only, enable_async_checkpointing=False,
                                         save_interval_steps=0 if read_only else 1)
  with _quiet_absl():  # orbax warns "Given directory is read only" on every read-only open: expected here
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "config", "metadata"))


@contextlib.contextmanager
def _quiet_absl():
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(level)


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
    state = _restore_state(mngr, step, abstract)
  except Exception as e:  # orbax raises many types for unreadable or mismatched folders
    if "noise_stats" not in str(e):
      raise CheckpointError(f"checkpoint {mngr.directory}/{step} could not be restored: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    # Written before importance sampling existed: restore what it has; the histogram starts uniform.
    fields = {k: getattr(abstract, k) for k in abstract.__dataclass_fields__ if k != "noise_stats"}
    try:
      restored = _restore_state(mngr, step, fields)
    except Exception as e2:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {mngr.directory}/{step} could not be restored: "
                            f"{type(e2).__name__}: {str(e2).splitlines()[0][:300]}") from e2
    fresh = jax.tree.map(lambda s: jax.device_put(np.ones(s.shape, s.dtype), sharding), abstract.noise_stats)
    state = like.replace(**restored, noise_stats=fresh)
  return state.replace(key=jax.random.wrap_key_data(state.key))


def _restore_state(mngr: ocp.CheckpointManager, step: int, abstract: Any) -> Any:
  return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]


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
  return migrate_config(restored["config"]), dict(restored["metadata"] or {})


def migrate_config(saved: dict) -> ml_collections.ConfigDict:
  """A saved config (as a dict) in today's form: fields moved, later fields added, removed ones dropped.

  The old values are kept, so the model is the one the checkpoint trained.
  """
  saved = copy.deepcopy(dict(saved))
  moved = {new: _pop(saved, old) for old, new in MOVED_FIELDS.items()
           if _has(saved, old) and not isinstance(_get(saved, old), dict)}  # a dict: already a section
  for new, value in moved.items():  # after every pop: "model.schedule" was a string, now a section
    _put(saved, new, value)
  for field, value in LATER_FIELDS.items():
    if not _has(saved, field) and _has(saved, field.rsplit(".", 1)[0]):
      _put(saved, field, value)
  for field in REMOVED_FIELDS:
    if _has(saved, field):
      _pop(saved, field)
  return ml_collections.ConfigDict(saved)


def _has(tree: dict, field: str) -> bool:
  for name in field.split("."):
    if not isinstance(tree, dict) or name not in tree:
      return False
    tree = tree[name]
  return True


def _get(tree: dict, field: str):
  for name in field.split("."):
    tree = tree[name]
  return tree


def _pop(tree: dict, field: str):
  *sections, name = field.split(".")
  for section in sections:
    tree = tree[section]
  return tree.pop(name)


def _put(tree: dict, field: str, value) -> None:
  *sections, name = field.split(".")
  for section in sections:
    tree = tree.setdefault(section, {})
  tree[name] = value


# Where the fields of the flat ``model`` section of the first checkpoints live now.
MOVED_FIELDS = {
    "model.schedule": "model.schedule.name",
    "model.gamma_min": "model.schedule.gamma_min",
    "model.gamma_max": "model.schedule.gamma_max",
    "model.schedule_hidden": "model.schedule.hidden",
    **{f"model.{name}": f"model.network.{name}" for name in (
        "channels", "num_blocks", "dropout", "mid_attention", "attention_everywhere", "fourier_exponents",
        "scan_blocks")},
    **{f"model.{name}": f"execution.{name}" for name in (
        "remat", "remat_policy", "dtype", "matmul_precision", "conv_grad")},
    "model.schedule.minimize_variance": "training.minimize_variance",  # how it trains, not what it is
}

# Config fields added after checkpoints were first written, with the value
# that reproduces what those checkpoints were trained with.
LATER_FIELDS = {
    "execution.conv_grad": "xla",
    "execution.matmul_precision": "default",
    "execution.remat_policy": "full",
    "execution.dropout_rng": "threefry",
    "execution.scan_unroll": 1,
    "execution.skip_concat": "before_norm",
    "execution.skip_projection": "dense",
    "execution.attention": "xla",
    "execution.float32_residuals": False,
    "execution.group_norm": "xla",
    "execution.pallas_num_warps": 8,
    "execution.pallas_programs": 1,
    "execution.pallas_accumulate": "rows",
    "execution.threefry_gpu_kernel": False,
    "data.augment": False,
    "eval.full_precision": True,
    "model.network.norm_groups": 0,
    "model.network.channel_mult": (1,),
    "model.network.input_skip": True,
    "model.network.patch_size": 1,
    "training.minimize_variance": False,
    "model.prediction": "eps",
    "model.loss_weighting": "elbo",
    "model.sigmoid_bias": 2.0,
    "training.importance_bins": 0,
    "training.importance_decay": 0.99,
    "training.importance_floor": 0.1,
    "model.num_classes": 0,
    "model.label_dropout": 0.1,
    "eval.guidance": 0.0,
    "eval.langevin_steps": 0,
    "eval.langevin_snr": 0.1,
    "eval.gamma_path": "schedule",  # as evaluated before the field: the schedule's own path
    "optimizer.schedule_lr_scale": 1.0,
    "eval.ode": {"rtol": 1e-5, "atol": 1e-5, "max_steps": 4096, "dequantization": "decoder", "examples": 0},
}

# Config fields that no longer exist; dropped from saved configs.
REMOVED_FIELDS = (
    "training.debug_nonfinite_step",  # a test hook; the tests now inject faults themselves
)


def check_compatible(mngr: ocp.CheckpointManager, step: Optional[int], config: ml_collections.ConfigDict,
                     image_shape) -> None:
  """Refuses a checkpoint whose model config or image shape differs from the run's.

  Raises CheckpointError listing the differing fields.
  """
  saved, metadata = restore_config(mngr, step)
  diffs = [f"{field}: checkpoint {have!r}, config {want!r}" for field, have, want in model_differences(saved, config)]
  saved_shape = tuple(metadata.get("image_shape", ()))
  if saved_shape and saved_shape != tuple(image_shape):
    diffs.append(f"image shape: checkpoint {saved_shape}, data {tuple(image_shape)}")
  if diffs:
    raise CheckpointError(f"checkpoint {mngr.directory} was made by a different model ("
                          + "; ".join(diffs) + "); use another --workdir, or pass "
                          "--allow_config_mismatch to load it anyway")


def model_differences(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[tuple]:
  """(field, checkpoint's value, config's value) for each field of ``model`` (and ``data.augment``) that differs.

  ``execution`` may differ: it changes how the network is computed, not its parameters.
  """
  want, have = _flat(config.model.to_dict(), "model."), _flat(saved.model.to_dict(), "model.")
  diffs = [(k, have.get(k), want.get(k)) for k in sorted(set(want) | set(have))
           if _plain(want.get(k)) != _plain(have.get(k))]
  if bool(saved.data.get("augment", False)) != bool(config.data.augment):
    diffs.append(("data.augment", saved.data.get("augment", False), config.data.augment))
  return diffs


def _flat(tree: dict, prefix: str) -> dict:
  """{"a": {"b": 1}} → {"<prefix>a.b": 1}."""
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def check_loadable(directory: str, saved_like: Any, like: Any, differences: list[tuple]) -> None:
  """Refuses, before orbax tries, a checkpoint whose arrays do not fit the run's state.

  ``saved_like`` and ``like``: the abstract TrainStates of the checkpoint's
  config and of the run's. ``differences``: from :func:`model_differences`,
  named in the message as the overrides to drop.
  """
  have = {jax.tree_util.keystr(p): leaf.shape for p, leaf in jax.tree_util.tree_flatten_with_path(saved_like)[0]}
  want = {jax.tree_util.keystr(p): leaf.shape for p, leaf in jax.tree_util.tree_flatten_with_path(like)[0]}
  problems = [f"{k}: checkpoint {have[k]}, config {want[k]}" for k in want if k in have and have[k] != want[k]]
  problems += [f"{k}: not in the checkpoint" for k in want if k not in have]
  problems += [f"{k}: not in the config's model" for k in have if k not in want]
  if problems:
    fields = ", ".join(field for field, _, _ in differences) or "the model fields"
    raise CheckpointError(
        f"checkpoint {directory} cannot be loaded even with --allow_config_mismatch: its arrays do not fit "
        f"this config's model ({len(problems)} differ, e.g. " + "; ".join(problems[:3]) + f"); drop the "
        f"overrides of {fields} (the checkpoint has " + ", ".join(f"{f}={h!r}" for f, h, _ in differences) + ")")


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
  siblings = saved_steps(os.path.dirname(path)) if base.isdigit() else []
  if siblings:
    raise FileNotFoundError(f"no checkpoint of step {base} in {os.path.dirname(path)!r}; saved steps: "
                            + ", ".join(map(str, siblings)))
  for candidate in (os.path.join(path, "checkpoints"), path):
    if saved_steps(candidate):
      return candidate, None
  raise FileNotFoundError(f"no checkpoint under {path!r} (expected <workdir>/checkpoints/<step>/)")


def saved_steps(directory: str) -> list[int]:
  """The steps with a complete checkpoint folder in ``directory`` (half-written ones have other names)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit() and os.path.isdir(os.path.join(directory, d)))

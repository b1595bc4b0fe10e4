"""Data parallelism on every device: one ``data`` mesh axis, batch sharded, state replicated.

The same code runs on one CPU, a multi-GPU box, a TPU pod or several hosts
(``jax.distributed``): each process feeds only its own slice of the global
batch, and ``jit`` with these shardings does the rest. Random draws are made
for the global batch inside ``jit`` (JAX's partitionable threefry), so the
numbers do not depend on how the batch is split across devices.
"""

import functools
import os
from typing import Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vdm.config import ConfigError


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def on_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """``fn`` traced with ``mesh`` as JAX's context mesh: what cannot be split by XLA itself (the Pallas
  GroupNorm kernels, :mod:`vdm.group_norm`) then runs on each device's share of the batch."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Shards axis ``leading_axes`` (the batch axis) over ``data``; earlier axes stay whole."""
  return NamedSharding(mesh, P(*([None] * leading_axes), "data"))


def check_batch(batch_size: int, field: str) -> None:
  """The global batch must split evenly over devices (and so over processes)."""
  devices = jax.device_count()
  if batch_size % devices:
    raise ConfigError(f"config.{field}: expected a multiple of the {devices} devices "
                      f"({jax.process_count()} process(es)), got {batch_size}")


def round_up(batch_size: int) -> int:
  """The smallest multiple of the device count ≥ ``batch_size`` (for padded batches)."""
  devices = jax.device_count()
  return -(-batch_size // devices) * devices


def to_global(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """This process's slice of a batch → the global array, sharded on ``data``."""
  return jax.make_array_from_process_local_data(sharding, local)


def from_host(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array that every process holds whole → a global array with ``sharding``."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(x: jax.Array) -> np.ndarray:
  """A global array, whole, on every process's host."""
  if jax.process_count() == 1 or x.is_fully_replicated:
    return np.asarray(x.addressable_data(0)) if x.is_fully_replicated else np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _cluster_detected() -> bool:
  """SLURM, Open MPI or a multi-host TPU slice: where initialize() finds its peers itself."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))


def initialize(coordinator_address: str = "", num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Starts ``jax.distributed`` when several processes are asked for or detected; else nothing."""
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ConfigError("coordinator_address needs num_processes and process_id")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif _cluster_detected():
    jax.distributed.initialize()

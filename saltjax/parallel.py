"""Data parallelism over a jax.sharding.Mesh of every device, on every host.

The batch is split along its first axis over the mesh's 'data' axis; the
train state is replicated. One jitted step serves any number of devices:
XLA inserts the cross-device reductions (gradients, BatchNorm statistics over
the global batch) that the sharding implies.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def create_mesh(devices=None) -> Mesh:
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), ("data",))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, option: str) -> None:
  if batch_size % mesh.size:
    raise ValueError(
        f"{option}={batch_size} is not divisible by the {mesh.size} devices")
  if batch_size % jax.process_count():
    raise ValueError(
        f"{option}={batch_size} is not divisible by the {jax.process_count()} processes")


def global_from_local(batch, mesh: Mesh):
  """A global batch from each process's own rows (training data shards)."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def global_from_replicated(batch, mesh: Mesh):
  """A global batch when every process holds the same full batch (inference)."""
  n, i = jax.process_count(), jax.process_index()
  def local(x):
    rows = x.shape[0] // n
    return x[i * rows:(i + 1) * rows]
  return global_from_local(jax.tree.map(local, batch), mesh)


def to_host(x) -> np.ndarray:
  """A global array as one numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))

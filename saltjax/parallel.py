"""Data parallelism over a jax.sharding.Mesh of every device, on every host.

The batch is split along its first axis over the mesh's 'data' axis; the
train state's weights and BatchNorm statistics are replicated, and its
optimiser moments are replicated or split over the same axis
(`state_sharding`). One jitted step serves any number of devices: XLA
inserts the cross-device reductions (gradients, BatchNorm statistics over
the global batch) and gathers that the sharding implies.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from saltjax.errors import ConfigError


def create_mesh(devices=None) -> Mesh:
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), ("data",))


def data_sharding(mesh: Mesh, fold_axis: bool = False) -> NamedSharding:
  """The batch axis over the devices; with `fold_axis`, batches are (F, B, ...)."""
  return NamedSharding(mesh, P(None, "data") if fold_axis else P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


STATE_SHARDINGS = ("replicated", "optimizer")


def state_sharding(mesh: Mesh, how: str, abstract_state: Callable[[], Any]):
  """Where a train state with a leading fold axis lives: a sharding, or a tree of them.

  'replicated': every leaf on every device (one sharding, a prefix of any
  state). 'optimizer': the optimiser's moments split over the 'data' axis
  (ZeRO stage 1, Rajbhandari et al. 2020), each leaf along its largest axis
  that the devices divide (never the fold axis, so one sharding serves any
  number of folds); weights, BatchNorm statistics and leaves no axis of
  which divides stay replicated. Each device then updates only its share of
  the weights (XLA slices the gradients and gathers the new weights), so the
  moments' memory per device shrinks with the devices. The update's own
  traffic does too, but gathering the new weights costs most of what that
  saves (4% fewer HBM bytes a step on a v5e-8 at configs/tpu.py's batch, 11%
  on a v5e-64: benchmarks/README.md): this is mostly for memory.

  abstract_state: () -> the state's shapes (`jax.eval_shape`), called only
  where leaves are split: tracing the optimiser's init is start-up time.
  """
  if how not in STATE_SHARDINGS:
    raise ConfigError(
        f"unknown config.state_sharding {how!r}: use one of {', '.join(STATE_SHARDINGS)}"
    )
  repl = replicated(mesh)
  if how == "replicated" or mesh.size == 1:
    return repl

  def split(x) -> NamedSharding:
    shape = np.shape(x)
    axes = [a for a in range(1, len(shape)) if shape[a] % mesh.size == 0]
    if not axes:
      return repl
    spec = [None] * len(shape)
    spec[max(axes, key=lambda a: (shape[a], a))] = "data"
    return NamedSharding(mesh, P(*spec))

  state = abstract_state()
  shardings = jax.tree.map(lambda _: repl, state)
  return shardings.replace(opt_state=jax.tree.map(split, state.opt_state))


@functools.lru_cache(maxsize=None)
def _replicate(mesh: Mesh):
  return jax.jit(lambda tree: tree, out_shardings=replicated(mesh))


def readable_on_every_host(tree):
  """`tree` with each array split over several hosts' devices copied whole onto every device.

  A host can read an array whole only where every part of it is on its own
  devices: a replicated one always is, and so is any array of a one-host
  job; one split over several hosts' devices (the optimiser moments under
  state_sharding='optimizer' on a pod) is not. Every process must call this
  (it runs one program over the mesh).
  """
  leaves, treedef = jax.tree.flatten(tree)
  split = [
      i
      for i, x in enumerate(leaves)
      if not (x.sharding.is_fully_replicated or x.is_fully_addressable)
  ]
  if not split:
    return tree
  whole = _replicate(leaves[split[0]].sharding.mesh)([leaves[i] for i in split])
  for i, x in zip(split, whole):
    leaves[i] = x
  return jax.tree.unflatten(treedef, leaves)


def place_host_values(tree, sharding, what: str):
  """Host values that every process holds the same, placed on `sharding`'s devices.

  `sharding`: one sharding for every leaf, or a tree of them (a prefix of
  `tree`'s, as `jax.device_put` takes; a state sharding). One process:
  `jax.device_put`. Several: each process copies its own devices' parts
  (`jax.make_array_from_callback`), and one all-gather of a 16-byte digest of
  the whole tree checks that every process held the same values, an error
  naming `what` and the processes that differ if not. `jax.device_put` checks
  the same per leaf by gathering every array whole from every host: a train
  state's hundreds of leaves, each a collective, and on a pod of H hosts H
  copies of the state (or of the dataset) in each host's memory before
  training starts.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  shardings = jax.tree.broadcast(sharding, tree)
  digest = hashlib.blake2b(digest_size=16)

  def place(x, s):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, s)  # already global: a reshard, no host values
    x = np.asarray(x)
    x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)
    digest.update(f"{x.dtype}{x.shape}".encode())
    digest.update(np.ascontiguousarray(x).data)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

  placed = jax.tree.map(place, tree, shardings)
  ours = np.frombuffer(digest.digest(), np.uint8)
  every = np.asarray(multihost_utils.process_allgather(ours))
  differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
  if differ:
    raise RuntimeError(
        f"{what} differs between processes: process(es) {', '.join(map(str, differ))} hold"
        " other values than process 0 (every process must read the same data and checkpoints)"
    )
  return placed


def check_batch_size(batch_size: int, mesh: Mesh, option: str) -> None:
  if batch_size % mesh.size:
    raise ConfigError(f"{option}={batch_size} is not divisible by the {mesh.size} devices")
  if batch_size % jax.process_count():
    raise ConfigError(
        f"{option}={batch_size} is not divisible by the {jax.process_count()} processes"
    )


def global_from_local(batch, mesh: Mesh, fold_axis: bool = False):
  """A global batch from each process's own rows (training data shards)."""
  sharding = data_sharding(mesh, fold_axis)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def global_from_replicated(batch, mesh: Mesh, fold_axis: bool = False):
  """A global batch when every process holds the same full batch (inference)."""
  n, i = jax.process_count(), jax.process_index()
  axis = 1 if fold_axis else 0

  def local(x):
    rows = x.shape[axis] // n
    return x[i * rows : (i + 1) * rows] if axis == 0 else x[:, i * rows : (i + 1) * rows]

  return global_from_local(jax.tree.map(local, batch), mesh, fold_axis)


def to_host(x) -> np.ndarray:
  """A global array as one numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def process_0_decides(decide):
  """`decide()` computed on process 0 alone, and its (JSON) result on every process.

  A choice read from files (which checkpoints a fold predicts with, from its
  done.json) can differ between hosts that see a shared disk at different
  moments (a file written a moment ago, NFS attribute caching); placing
  different weights as one replicated array is silently wrong. Deciding once
  and sharing the decision makes every host use the same models.
  """
  if jax.process_count() == 1:
    return decide()
  import json

  text = json.dumps(decide()).encode() if jax.process_index() == 0 else b""
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(text))))
  buffer = np.zeros(size, np.uint8)
  buffer[: len(text)] = np.frombuffer(text, np.uint8)
  return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes())

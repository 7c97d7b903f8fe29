"""Multi-host training for real: 2 processes joined by jax.distributed = 1 process.

Two CPU processes call `jax.distributed.initialize` with a coordinator on
127.0.0.1 (a free port), exactly as each host of a pod does, and run one
step of the real train step (`train.Job.create`, `train.compile_train_steps`)
over a mesh spanning both processes' devices. Each process holds only its
own half of a fixed global batch (its shard) and builds the global batch with
`parallel.global_from_local`, as `train.train_fold` does. A third process
runs the same step on the full batch alone. Loss, updated parameters and
BatchNorm statistics must agree at float32 tolerance: the cross-process
reductions (gradients, global-batch BatchNorm) are really computed.

Both processes also build batches with the on-device input pipeline
(`saltjax.device_input`): with the device data replicated on both hosts, the
global batch, sharded over the two processes, equals the 1-process batch.

The step uses SGD, as tests/test_parallel.py explains: Adam's first update is
the sign of the gradient, which float32 summation order can flip for entries
near zero; SGD keeps the parameters comparable at float32 tolerance.

JAX's CPU backend needs the gloo collectives for cross-process all-reduces
(`jax_cpu_collectives_implementation`).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
GLOBAL_BATCH = 8
IMAGE_SIZE = 64
RTOL, ATOL = 1e-5, 1e-6
# Generous: compiling the step takes ~35 s of CPU a process, more on shared CPUs.
TIMEOUT_S = 600
XLA_FLAGS = (
    # Compile-time savers: lower LLVM's effort on the CPU code, not what the
    # HLO computes; every process compared gets them.
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)


# -------------------------------------------------------- the processes ---


def _tiny_config():
  from tests.conftest import step_config

  config = step_config(GLOBAL_BATCH, IMAGE_SIZE)
  config.augment = "hflip|shift(4)|brightness(0.1)"
  return config


def _global_batch():
  """The fixed global batch: noise images, blob masks (two empty)."""
  from tests.conftest import blob_batch

  return blob_batch(np.random.default_rng(0), GLOBAL_BATCH, IMAGE_SIZE)


def _dataset():
  """A small uint8 dataset for the device pipeline (every host holds all of it)."""
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(24, 101, 101), dtype=np.uint8)
  masks = (rng.uniform(size=(24, 101, 101)) < 0.3).astype(np.uint8)
  return images, masks, np.arange(24) % 3


def _local(x):
  """This process's rows of a global array (replicated: the whole of it)."""
  import jax

  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def _worker(out_dir: str, process_id: int, port: int) -> None:
  """One step of training (and one device-pipeline batch) as process `process_id`.

  process_id -1: the 1-process reference, on the full batch.
  """
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if process_id >= 0:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=NUM_PROCESSES,
        process_id=process_id,
        initialization_timeout=120,
    )
  imports = time.time()
  from saltjax import device_input
  from saltjax import parallel
  from saltjax import train

  print(f"imports {time.time() - imports:.1f}s", flush=True)

  timings, started = {}, time.time()
  config = _tiny_config()
  mesh = parallel.create_mesh()
  facts = {
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "mesh_devices": mesh.size,
      "local_devices": jax.local_device_count(),
  }

  fold_of = np.arange(3 * GLOBAL_BATCH) % config.num_folds
  job = train.Job.create(config, mesh, fold_of, writer=None)
  timings["job"] = round(time.time() - started, 1)
  step = job.train_steps[config.loss.name]
  # One fold model (the step takes a leading fold axis).
  state = jax.device_put(train._stack([job.new_state()]), parallel.replicated(mesh))

  # This process reads its own shard of the global batch, and only that.
  batch = _global_batch()
  n, i = jax.process_count(), jax.process_index()
  rows = GLOBAL_BATCH // n
  own = {k: v[None, i * rows : (i + 1) * rows] for k, v in batch.items()}
  global_batch = parallel.global_from_local(own, mesh, fold_axis=True)
  facts["local_rows"] = sorted(s.data.shape[1] for s in global_batch["image"].addressable_shards)
  new_state, step_metrics = step(state, global_batch)
  jax.block_until_ready(new_state)
  timings["step"] = round(time.time() - started, 1)

  results = {"loss": _local(step_metrics["loss"])[0]}
  flat = jax.tree_util.tree_leaves_with_path(
      jax.tree.map(
          lambda x: x[0], {"params": new_state.params, "batch_stats": new_state.batch_stats}
      )
  )
  for path, leaf in flat:
    results[jax.tree_util.keystr(path)] = _local(leaf)
  facts["param_checksum"] = float(
      sum(
          np.sum(np.abs(v), dtype=np.float64)
          for k, v in results.items()
          if k.startswith("['params']")
      )
  )

  # The device pipeline: data replicated on every host, batch sharded over all.
  images, masks, folds_of = _dataset()
  data = device_input.put_on_device(images, masks, sharding=parallel.replicated(mesh))
  folds = device_input.fold_indices(
      folds_of, [0, 1], seed=config.seed, sharding=parallel.replicated(mesh)
  )
  from jax.sharding import NamedSharding, PartitionSpec as P

  batch_fn = jax.jit(
      device_input.make_train_batch_fn(config, GLOBAL_BATCH),
      out_shardings=NamedSharding(mesh, P(None, "data")),
  )
  device_batch = batch_fn(data, folds, 1, 1)
  # (F, B, ...) sharded on B: this process's rows of every fold.
  for key, value in device_batch.items():
    shards = sorted(value.addressable_shards, key=lambda s: s.index[1].start or 0)
    results[f"device_{key}"] = np.concatenate([np.asarray(s.data) for s in shards], axis=1)
    facts[f"device_{key}_rows"] = [s.index[1].start or 0 for s in shards]

  timings["device_input"] = round(time.time() - started, 1)
  facts["timings"] = timings
  name = "single" if process_id < 0 else f"process_{process_id}"
  np.savez(os.path.join(out_dir, f"{name}.npz"), **results)
  pathlib.Path(out_dir, f"{name}.json").write_text(json.dumps(facts))
  if process_id >= 0:
    jax.distributed.shutdown()


# ------------------------------------------------------------- the test ---


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(out_dir, process_id: int, port: int, log) -> subprocess.Popen:
  env = dict(os.environ)
  env.update(
      JAX_PLATFORMS="cpu",
      PYTHONPATH=str(REPO),
      TF_CPP_MIN_LOG_LEVEL="2",
      XLA_FLAGS=" ".join([env.get("XLA_FLAGS", ""), *XLA_FLAGS]).strip(),
  )
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return subprocess.Popen(
      [sys.executable, __file__, str(out_dir), str(process_id), str(port)],
      cwd=REPO,
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
  )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("multihost")
  port = _free_port()
  # Output to files, not pipes: a full pipe would stall a process mid-collective.
  logs = {name: open(out / f"{name}.log", "w") for name in ("process_0", "process_1", "single")}
  procs = {
      name: _start(out, pid, port, logs[name])
      for name, pid in (("process_0", 0), ("process_1", 1), ("single", -1))
  }
  deadline, timed_out = time.time() + TIMEOUT_S, set()
  try:
    for name, proc in procs.items():
      try:
        proc.wait(timeout=max(1.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        timed_out.add(name)
  finally:
    for name, proc in procs.items():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      logs[name].close()
  outputs = {
      name: (out / f"{name}.log").read_text()
      + (f"\n[killed: still running after {TIMEOUT_S}s]" if name in timed_out else "")
      for name in procs
  }
  failed = {name: p.returncode for name, p in procs.items() if p.returncode != 0}
  assert not failed, "worker(s) failed: " + "".join(
      f"\n--- {name} (exit {procs[name].returncode}) ---\n{outputs[name][-4000:]}" for name in procs
  )
  results = {}
  for name in procs:
    with np.load(out / f"{name}.npz") as f:
      results[name] = {k: f[k] for k in f.files}
    results[name]["facts"] = json.loads((out / f"{name}.json").read_text())
  return results


def test_two_processes_form_one_mesh(runs):
  for i in range(NUM_PROCESSES):
    facts = runs[f"process_{i}"]["facts"]
    assert facts["process_index"] == i and facts["process_count"] == NUM_PROCESSES
    assert facts["local_devices"] == 1 and facts["mesh_devices"] == NUM_PROCESSES
    # Each process held its half of the batch only.
    assert facts["local_rows"] == [GLOBAL_BATCH // NUM_PROCESSES]
  single = runs["single"]["facts"]
  assert single["process_count"] == 1 and single["local_rows"] == [GLOBAL_BATCH]


def test_one_step_equals_the_one_process_step(runs):
  single = runs["single"]
  keys = [k for k in single if k.startswith("['")]
  assert any(k.startswith("['params']") for k in keys)
  assert any(k.startswith("['batch_stats']") for k in keys)
  for i in range(NUM_PROCESSES):
    ours = runs[f"process_{i}"]
    np.testing.assert_allclose(
        ours["loss"], single["loss"], rtol=RTOL, atol=ATOL, err_msg=f"loss of process {i}"
    )
    for key in keys:
      np.testing.assert_allclose(
          ours[key], single[key], rtol=RTOL, atol=ATOL, err_msg=f"{key} of process {i}"
      )
    np.testing.assert_allclose(
        ours["facts"]["param_checksum"], single["facts"]["param_checksum"], rtol=1e-6
    )
  # The processes' replicas of the state agree exactly with each other.
  for key in keys:
    np.testing.assert_array_equal(runs["process_0"][key], runs["process_1"][key])
  assert np.isfinite(single["loss"])


def test_device_pipeline_batch_equals_one_process(runs):
  single = runs["single"]
  half = GLOBAL_BATCH // NUM_PROCESSES
  for i in range(NUM_PROCESSES):
    ours = runs[f"process_{i}"]
    assert ours["facts"]["device_image_rows"] == [i * half]
    for key in ("image", "mask"):
      np.testing.assert_allclose(
          ours[f"device_{key}"],
          single[f"device_{key}"][:, i * half : (i + 1) * half],
          rtol=0,
          atol=1e-6,
          err_msg=f"device {key}, process {i}",
      )


if __name__ == "__main__":
  sys.path.insert(0, str(REPO))
  _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

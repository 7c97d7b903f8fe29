"""Multi-host training for real: 2 processes joined by jax.distributed = 1 process.

Two CPU processes call `jax.distributed.initialize` with a coordinator on
127.0.0.1 (a free port), exactly as each host of a pod does, and run one
step of the real train step (`job.Job.create`, `steps.compile_train_steps`)
over a mesh spanning both processes' devices. Each process holds only its
own half of a fixed global batch (its shard) and builds the global batch with
`parallel.global_from_local`, as the training's tf.data feeder does with each
host's batches (`saltjax.training`). A third process
runs the same step on the full batch alone. Loss, updated parameters and
BatchNorm statistics must agree at float32 tolerance: the cross-process
reductions (gradients, global-batch BatchNorm) are really computed.

Both processes also build batches with the on-device input pipeline
(`saltjax.input_pipeline.on_device`): with the device data replicated on both hosts, the
global batch, sharded over the two processes, equals the 1-process batch.

Tolerances are derived, not measured: what float32 summation order can
change in a mean of the step's largest number of terms, at the size of what
is compared (tests.conftest.reduction_order_tolerance); a shard counted twice
is shown to fail them.

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

REPO = pathlib.Path(__file__).resolve().parents[2]
NUM_PROCESSES = 2
GLOBAL_BATCH = 8
IMAGE_SIZE = 64
# Generous: compiling the step takes ~35 s of CPU a process, more on shared CPUs.
TIMEOUT_S = 600


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
  from saltjax.input_pipeline import on_device
  from saltjax import parallel
  from saltjax.training.job import Job
  from saltjax.training.state import stack_folds

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
  job = Job.create(config, mesh, fold_of, writer=None)
  timings["job"] = round(time.time() - started, 1)
  step = job.train_steps[config.loss.name]
  # One fold model (the step takes a leading fold axis).
  state = job.place_state(stack_folds([job.new_state()]))

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
  for path, leaf in jax.tree_util.tree_leaves_with_path(job.initial_variables):
    results["init" + jax.tree_util.keystr(path)] = np.asarray(leaf)

  # A real error, for the tests to catch: process 1 feeds process 0's rows
  # (process 0's shard counted twice, process 1's dropped).
  if process_id >= 0:
    doubled = {k: v[None, :rows] for k, v in batch.items()}
    state = job.place_state(stack_folds([job.new_state()]))
    wrong_state, wrong_metrics = step(
        state, parallel.global_from_local(doubled, mesh, fold_axis=True)
    )
    results["doubled/loss"] = _local(wrong_metrics["loss"])[0]
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        jax.tree.map(
            lambda x: x[0], {"params": wrong_state.params, "batch_stats": wrong_state.batch_stats}
        )
    ):
      results["doubled/" + jax.tree_util.keystr(path)] = _local(leaf)
  facts["param_checksum"] = float(
      sum(
          np.sum(np.abs(v), dtype=np.float64)
          for k, v in results.items()
          if k.startswith("['params']")
      )
  )

  # The device pipeline: data replicated on every host, batch sharded over all.
  images, masks, folds_of = _dataset()
  data = on_device.put_on_device(images, masks, sharding=parallel.replicated(mesh))
  folds = on_device.fold_indices(
      folds_of, [0, 1], seed=config.seed, sharding=parallel.replicated(mesh)
  )
  from jax.sharding import NamedSharding, PartitionSpec as P

  batch_fn = jax.jit(
      on_device.make_train_batch_fn(config, GLOBAL_BATCH),
      out_shardings=NamedSharding(mesh, P(None, "data")),
  )
  device_batch = batch_fn(data, folds, 1, 1)
  # (F, B, ...) sharded on B: this process's rows of every fold.
  for key, value in device_batch.items():
    shards = sorted(value.addressable_shards, key=lambda s: s.index[1].start or 0)
    results[f"device_{key}"] = np.concatenate([np.asarray(s.data) for s in shards], axis=1)
    facts[f"device_{key}_rows"] = [s.index[1].start or 0 for s in shards]

  timings["device_input"] = round(time.time() - started, 1)

  # Host values placed on the mesh, one leaf split over the processes' devices:
  # read back whole, the values given. Values that differ between the
  # processes are refused on every process, naming them.
  given = {"w": np.arange(12, dtype=np.float32).reshape(4, 3), "n": np.int32(7)}
  where = {"w": NamedSharding(mesh, P("data")), "n": parallel.replicated(mesh)}
  placed = parallel.readable_on_every_host(parallel.place_host_values(given, where, "a tree"))
  facts["placed"] = {k: _local(v).tolist() for k, v in placed.items()}
  if process_id >= 0:
    try:
      parallel.place_host_values(np.float32(process_id), parallel.replicated(mesh), "a tree")
    except RuntimeError as e:
      facts["refused"] = str(e)
  facts["timings"] = timings

  # Which models a fold predicts with, when the hosts read different records:
  # process 1 sees a stale done.json (NFS attribute caching, a write a moment
  # ago) naming another best epoch. Every host must take process 0's choice.
  from saltjax.inference import ensemble

  view = pathlib.Path(out_dir, f"view_{process_id}")
  for epoch in (2, 3):
    (view / "fold_0" / "best" / str(epoch)).mkdir(parents=True, exist_ok=True)
  best_epoch = 3 if process_id == 1 else 2
  (view / "fold_0" / "done.json").write_text(json.dumps({"best_epoch": best_epoch}))
  facts["usable_folds"] = ensemble.usable_folds(view, 1, "best")[0]
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


# The largest float32 sum of the step: a gradient of the stem's kernel (or a
# BatchNorm statistic of its output) sums over every pixel of the global batch.
NUM_TERMS = GLOBAL_BATCH * IMAGE_SIZE * IMAGE_SIZE


def _step_mismatches(results: dict, single: dict, prefix: str = "") -> list[str]:
  """Where a process's step (keys under `prefix`) is further from the
  one-process step than float32 reduction order allows
  (tests.conftest.step_mismatches)."""
  from tests.conftest import step_mismatches

  ours = {k[len(prefix) :]: v for k, v in results.items() if k.startswith(prefix)}
  init = {k[len("init") :]: v for k, v in single.items() if k.startswith("init['")}
  reference = {k: v for k, v in single.items() if k.startswith("['") or k == "loss"}
  return step_mismatches(ours, reference, init, NUM_TERMS)


def test_one_step_equals_the_one_process_step(runs):
  """Within what float32 reduction order can change (_step_mismatches), on any machine."""
  single = runs["single"]
  keys = [k for k in single if k.startswith("['")]
  assert any(k.startswith("['params']") for k in keys)
  assert any(k.startswith("['batch_stats']") for k in keys)
  for i in range(NUM_PROCESSES):
    ours = runs[f"process_{i}"]
    bad = _step_mismatches(ours, single)
    assert not bad, f"process {i}: " + "\n".join(bad)
  # The processes' replicas of the state agree exactly with each other.
  for key in keys:
    np.testing.assert_array_equal(runs["process_0"][key], runs["process_1"][key])
  assert np.isfinite(single["loss"])


def test_the_step_comparison_catches_a_shard_counted_twice(runs):
  """The tolerance is no blanket: process 0's shard fed by both processes
  (process 1's dropped) fails the comparison above, in the parameters and in
  the BatchNorm statistics alike."""
  single = runs["single"]
  for i in range(NUM_PROCESSES):
    bad = _step_mismatches(runs[f"process_{i}"], single, prefix="doubled/")
    # The stem's kernel, whose gradient is the largest sum the tolerance is
    # sized for, is among the leaves caught, as are BatchNorm statistics.
    assert any(b.startswith("['params']['encoder']['conv1']['kernel']") for b in bad), bad
    assert any(b.startswith("['batch_stats']") for b in bad), bad


def test_every_host_predicts_with_process_0s_choice_of_models(runs):
  """Process 1's stale done.json names best epoch 3, process 0's epoch 2: both
  restore best/2, the step process 0 chose (and one process alone its own)."""
  for name in ("process_0", "process_1", "single"):
    assert runs[name]["facts"]["usable_folds"] == {"0": [["best", 2]]}, name


def test_host_values_are_placed_as_given_and_refused_where_processes_differ(runs):
  for name in ("process_0", "process_1", "single"):
    facts = runs[name]["facts"]
    assert facts["placed"] == {"w": np.arange(12).reshape(4, 3).tolist(), "n": 7}, name
  for i in range(NUM_PROCESSES):
    assert runs[f"process_{i}"]["facts"]["refused"].startswith(
        "a tree differs between processes: process(es) 1 hold other values than process 0"
    )


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

"""Data parallelism: one train step on 8 devices equals the same step on 1.

The train step (`steps.compile_train_steps`) is one jax.jit whose batch
argument is sharded over a Mesh of every device and whose state is
replicated; XLA inserts the cross-device reductions. This file checks the
claim that matters for correctness: with the same *global* batch, the loss,
the updated parameters, the optimiser state and the BatchNorm statistics are
those of a single device, i.e. BatchNorm statistics are taken over the global
batch, not per device.

XLA fixes the device count when the backend starts, so the 8-device work runs
in a subprocess started with XLA_FLAGS=--xla_force_host_platform_device_count=8
(this file run as a script). That process builds both the 8-device mesh and a
1-device mesh over the first of those same devices, runs one step on each from
identical initial states, and saves everything to an .npz that the tests here
compare.

Tolerances (float32) are derived from what summation order can change, not
measured on one machine (tests.conftest.reduction_order_tolerance): a mean of
n terms moves by at most about n * eps * (its terms' size) between two
orders, and the step's largest sums run over every pixel of the global
batch (n = NUM_TERMS = 16 * 64 * 64, n * eps = 7.8e-3):
- gradients: n * eps * (largest |gradient| of the model);
- updated parameters: n * eps * (largest parameter move, lr * |gradient|);
- loss, BatchNorm statistics: n * eps * (their own size, tests.conftest.step_mismatches).
Measured for scale: permuting the batch rows on 1 device moves the gradients
by 0.1e-3 to 1.2e-3 of the largest (ReLU kinks and BatchNorm's mean(x^2) -
mean(x)^2 amplify rounding); a real error moves them by a share of their
size: device 0's rows fed to device 1 too fails every comparison
(test_the_comparisons_catch_a_shard_counted_twice), and BatchNorm per device
would move the gradients by 1.1x the largest.
- IoU metric: atol 1e-3 (a logit within rounding of 0 can flip one pixel).

The step runs with SGD, not the recipe's Adam: Adam's first update is
lr * g / (|g| + eps), the sign of g, so a gradient entry that is float32
noise around 0 flips its parameter by 2 * lr between two equally correct
runs. SGD's update is linear in g, which keeps the parameters comparable at
float32 tolerance; its momentum trace after one step is g itself, which the
gradient test reads. The optimiser plays no part in the parallelism.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_DEVICES = 8
GLOBAL_BATCH = 16
IMAGE_SIZE = 64
# The largest float32 sum of the step: a gradient of the stem's kernel (or a
# BatchNorm statistic of its output) sums over every pixel of the global batch.
NUM_TERMS = GLOBAL_BATCH * IMAGE_SIZE * IMAGE_SIZE
# (conftest's compile-time savers come with the environment)
XLA_FLAGS = (f"--xla_force_host_platform_device_count={NUM_DEVICES}",)


# ------------------------------------------------- the 8-device subprocess ---


def tiny_config():
  """configs/quick.py shrunk further: same code path, seconds to compile."""
  from tests.conftest import step_config

  return step_config(GLOBAL_BATCH, IMAGE_SIZE)


FOLD_STEPS = 3


def _blobs(rng) -> dict[str, np.ndarray]:
  from tests.conftest import blob_batch

  return blob_batch(rng, GLOBAL_BATCH, IMAGE_SIZE)


def _worker(out_dir: str) -> None:
  """Runs one train step on 8 devices and on 1; saves results and facts."""
  import jax
  import jax.numpy as jnp
  from saltjax import parallel
  from saltjax.training.job import Job
  from saltjax.training.state import stack_folds
  from saltjax.training.steps import compile_train_steps, folds_train_step
  import ml_collections
  from tests.conftest import flat_leaves

  devices = jax.devices()
  assert len(devices) == NUM_DEVICES, f"expected {NUM_DEVICES} devices, got {devices}"
  config = tiny_config()
  # The 8-device step with the optimiser's moments split over the devices
  # (against the 1-device step): the same update, and the split checked.
  config.state_sharding = "optimizer"
  mesh8 = parallel.create_mesh()
  mesh1 = parallel.create_mesh(devices[:1])

  # The real Job: model, optimiser, initial variables and jitted steps. Folds
  # only size steps_per_epoch here, so a made-up assignment serves.
  fold_of = np.arange(3 * GLOBAL_BATCH) % config.num_folds
  started = time.time()
  job = Job.create(config, mesh8, fold_of, writer=None)
  timings = {"job": round(time.time() - started, 1)}
  step8 = job.train_steps[config.loss.name]
  step1 = compile_train_steps(config, mesh1)[config.loss.name]

  rng = np.random.default_rng(0)
  batch = _blobs(rng)
  images = batch["image"]

  # The same global batch with its rows permuted: mathematically the same
  # step (every loss and statistic is a mean over the batch), numerically a
  # different float32 summation order. Its distance from the 1-device run
  # is the noise floor that a failing gradient comparison reports.
  perm = rng.permutation(GLOBAL_BATCH)
  permuted = {"image": images[perm], "mask": batch["mask"][perm]}
  # A real error, for the tests to catch: device 1 gets device 0's rows
  # (device 0's shard counted twice, device 1's dropped).
  per_device = GLOBAL_BATCH // NUM_DEVICES
  doubled = {k: v.copy() for k, v in batch.items()}
  for v in doubled.values():
    v[per_device : 2 * per_device] = v[:per_device]

  facts, results, compiled = {}, {}, {}
  for name, mesh, step, host_batch in (
      ("8", mesh8, step8, batch),
      ("1", mesh1, step1, batch),
      ("perm", mesh1, step1, permuted),
      ("doubled", mesh8, step8, doubled),
  ):
    started = time.time()
    # A fresh state per run (the step donates its input state), with a
    # leading fold axis of one fold.
    state = jax.device_put(stack_folds([job.new_state()]), parallel.replicated(mesh))
    folded = {k: v[None] for k, v in host_batch.items()}
    global_batch = parallel.global_from_local(folded, mesh, fold_axis=True)
    x = global_batch["image"]
    facts[f"devices_{name}"] = len(x.sharding.device_set)
    facts[f"shard_rows_{name}"] = sorted({s.data.shape[1] for s in x.addressable_shards})
    facts[f"shards_match_rows_{name}"] = all(
        np.array_equal(np.asarray(s.data), folded["image"][s.index]) for s in x.addressable_shards
    )
    # Compiled once per mesh through the jitted step's own lowering, then run.
    if id(step) not in compiled:
      compiled[id(step)] = step.lower(state, global_batch).compile()
    executable = compiled[id(step)]
    facts[f"all_reduce_{name}"] = "all-reduce" in executable.as_text()
    new_state, step_metrics = executable(state, global_batch)
    jax.block_until_ready(new_state)
    facts[f"state_devices_{name}"] = len(jax.tree.leaves(new_state.params)[0].sharding.device_set)
    facts[f"state_replicated_{name}"] = all(
        leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(new_state.params)
    )
    facts[f"step_{name}"] = int(new_state.step[0])
    # (shape, one device's shard shape) of every optimiser-state array.
    facts[f"opt_state_shards_{name}"] = [
        (list(x.shape), list(x.addressable_shards[0].data.shape))
        for x in jax.tree.leaves(new_state.opt_state)
    ]
    one_fold = lambda tree: jax.tree.map(lambda x: x[0], tree)
    results.update(flat_leaves(one_fold(step_metrics), f"{name}/metrics"))
    results.update(flat_leaves(one_fold(new_state.params), f"{name}/params"))
    results.update(flat_leaves(one_fold(new_state.batch_stats), f"{name}/batch_stats"))
    results.update(flat_leaves(one_fold(new_state.opt_state), f"{name}/opt_state"))
    timings[name] = round(time.time() - started, 1)

  # Both device counts go through one code path: the same step function
  # (folds_train_step's) under the same compile_train_steps, only the mesh differs.
  step_code = folds_train_step(config, config.loss.name).__code__
  facts["same_step_function"] = all(
      getattr(getattr(s, "__wrapped__", None), "__code__", None) is step_code
      for s in (step8, step1)
  )

  # Two folds trained together (one step function over a leading fold axis,
  # the batch axis sharded over 8 devices) against each fold trained apart
  # on one device: each fold model has its own state and batches.
  started = time.time()
  fold_batches = [[_blobs(rng) for _ in range(FOLD_STEPS)] for _ in range(2)]
  # The folds vmapped (config.fold_strategy='vmap') and in turn ('in_turn').
  by_strategy = {}
  for strategy in ("vmap", "in_turn"):
    with_strategy = ml_collections.ConfigDict(config.to_dict())
    with_strategy.fold_strategy = strategy
    by_strategy[strategy] = compile_train_steps(with_strategy, mesh8)[config.loss.name]
  for name, step in (("together", by_strategy["vmap"]), ("in_turn", by_strategy["in_turn"])):
    state = jax.device_put(
        stack_folds([job.new_state(), job.new_state()]), parallel.replicated(mesh8)
    )
    for t in range(FOLD_STEPS):
      stacked = {k: np.stack([fold_batches[f][t][k] for f in range(2)]) for k in ("image", "mask")}
      state, step_metrics = step(state, parallel.global_from_local(stacked, mesh8, fold_axis=True))
      results[f"{name}/loss/{t}"] = np.asarray(jax.device_get(step_metrics["loss"]))
    for f in range(2):
      results.update(flat_leaves(jax.tree.map(lambda x: x[f], state.params), f"{name}{f}/params"))
      results.update(
          flat_leaves(jax.tree.map(lambda x: x[f], state.batch_stats), f"{name}{f}/batch_stats")
      )
  for f in range(2):
    alone = jax.device_put(stack_folds([job.new_state()]), parallel.replicated(mesh1))
    for t in range(FOLD_STEPS):
      folded = {k: v[None] for k, v in fold_batches[f][t].items()}
      alone, step_metrics = step1(alone, parallel.global_from_local(folded, mesh1, fold_axis=True))
      results[f"apart{f}/loss/{t}"] = np.asarray(jax.device_get(step_metrics["loss"]))[0]
    results.update(flat_leaves(jax.tree.map(lambda x: x[0], alone.params), f"apart{f}/params"))
    results.update(
        flat_leaves(jax.tree.map(lambda x: x[0], alone.batch_stats), f"apart{f}/batch_stats")
    )
  timings["folds"] = round(time.time() - started, 1)

  # What a per-device BatchNorm would have recorded: the statistics of one
  # device's 2 rows. The test checks the real ones are far from these, so
  # that the equality above could not hold by accident.
  started = time.time()
  variables = {
      "params": job.initial_variables["params"],
      "batch_stats": job.initial_variables["batch_stats"],
  }
  _, local_stats = jax.jit(
      lambda v, im: job.model.apply(v, im, train=True, mutable=["batch_stats"])
  )(variables, jnp.asarray(images[: GLOBAL_BATCH // NUM_DEVICES]))
  results.update(flat_leaves(local_stats["batch_stats"], "local/batch_stats"))
  results.update(flat_leaves(job.initial_variables["params"], "init/params"))
  results.update(flat_leaves(job.initial_variables["batch_stats"], "init/batch_stats"))
  timings["local_stats"] = round(time.time() - started, 1)

  facts["timings"] = timings
  np.savez(os.path.join(out_dir, "results.npz"), **results)
  pathlib.Path(out_dir, "facts.json").write_text(json.dumps(facts))


# ------------------------------------------------------------- the tests ---


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Runs the 8-device subprocess once for the module's tests."""
  out = tmp_path_factory.mktemp("parallel")
  env = dict(os.environ)
  env.update(
      JAX_PLATFORMS="cpu",
      PYTHONPATH=str(REPO),
      TF_CPP_MIN_LOG_LEVEL="2",
      XLA_FLAGS=" ".join([env.get("XLA_FLAGS", ""), *XLA_FLAGS]).strip(),
  )
  started = time.time()
  proc = subprocess.run(
      [sys.executable, __file__, str(out)],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, f"8-device worker failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
  facts = json.loads((out / "facts.json").read_text())
  facts["seconds"] = time.time() - started
  with np.load(out / "results.npz") as f:
    results = {k: f[k] for k in f.files}
  return facts, results


def _pairs(results, group, other="1"):
  """[(leaf name, 8-device value, `other` run's value)] of one saved group."""
  keys = sorted(k[len(f"8/{group}") :] for k in results if k.startswith(f"8/{group}"))
  assert keys, f"no {group} leaves saved"
  return [(k, results[f"8/{group}{k}"], results[f"{other}/{group}{k}"]) for k in keys]


def test_batch_is_sharded_over_every_device(run):
  facts, _ = run
  assert facts["devices_8"] == NUM_DEVICES
  assert facts["shard_rows_8"] == [GLOBAL_BATCH // NUM_DEVICES]
  assert facts["shards_match_rows_8"]
  assert facts["devices_1"] == 1 and facts["shard_rows_1"] == [GLOBAL_BATCH]
  # The updated state comes back replicated on every device of its mesh.
  assert facts["state_devices_8"] == NUM_DEVICES and facts["state_replicated_8"]
  assert facts["state_devices_1"] == 1 and facts["state_replicated_1"]
  assert facts["step_8"] == facts["step_1"] == 1


def test_optimizer_moments_are_split_over_the_devices(run):
  # config.state_sharding='optimizer': each optimiser-state array with an
  # axis (past the fold axis) that 8 divides is split 8 ways
  # along its largest such axis; the rest stay whole on every device.
  facts, _ = run
  split = 0
  for shape, shard in facts["opt_state_shards_8"]:
    axes = [a for a in range(1, len(shape)) if shape[a] % NUM_DEVICES == 0]
    expected = list(shape)
    if axes:
      axis = max(axes, key=lambda a: (shape[a], a))
      expected[axis] //= NUM_DEVICES
      split += 1
    assert shard == expected, (shape, shard)
  assert split > 0
  assert all(shard == shape for shape, shard in facts["opt_state_shards_1"])


def test_one_step_function_serves_both_device_counts(run):
  facts, _ = run
  assert facts["same_step_function"]
  # XLA turned the sharding into cross-device reductions on 8 devices only.
  assert facts["all_reduce_8"]
  assert not facts["all_reduce_1"]


def _step(results, name: str) -> dict:
  """Run `name`'s loss, parameters and BatchNorm statistics as step_mismatches takes them."""
  out = {}
  for group in ("params", "batch_stats"):
    prefix = f"{name}/{group}"
    out.update(
        {f"['{group}']" + k[len(prefix) :]: v for k, v in results.items() if k.startswith(prefix)}
    )
  if f"{name}/metrics['loss']" in results:
    out["loss"] = results[f"{name}/metrics['loss']"]
  return out


def _mismatches(results, name: str, reference: str = "1") -> list[str]:
  from tests.conftest import step_mismatches

  return step_mismatches(
      _step(results, name), _step(results, reference), _step(results, "init"), NUM_TERMS
  )


def test_loss_matches_one_device(run):
  from tests.conftest import parity_mismatches

  _, results = run
  pairs = _pairs(results, "metrics")
  for key, a, b in pairs:
    if key == "['iou']":
      # IoU thresholds logits at 0: a logit within rounding of 0 may flip one
      # pixel, which moves an image's IoU by ~1/union.
      np.testing.assert_allclose(a, b, atol=1e-3, err_msg=f"metrics{key}")
  losses = [k for k, _, _ in pairs if k.startswith("['loss")]
  assert "['loss']" in losses
  ours = {k: a for k, a, _ in pairs}
  assert not parity_mismatches(ours, {k: b for k, _, b in pairs}, losses, NUM_TERMS)
  assert np.isfinite(results["8/metrics['loss']"])
  assert results["8/metrics['finite']"]


def test_gradients_match_one_device(run):
  from tests.conftest import reduction_order_tolerance

  _, results = run

  # SGD's momentum trace after one step is the gradient itself (the rest of
  # the optimiser state is the schedule's step count).
  def traces(name, other="1"):
    return [(k, a, b) for k, a, b in _pairs(results, "opt_state", other) if ".trace" in k]

  pairs = traces("8")
  assert pairs and all(b.dtype == np.float32 for _, _, b in pairs)
  scale = max(float(np.max(np.abs(b))) for _, _, b in pairs)
  floor = max(float(np.max(np.abs(a - b))) for _, a, b in traces("8", "perm"))
  assert scale > 0
  for key, a, b in pairs:
    np.testing.assert_allclose(
        a,
        b,
        rtol=0,
        atol=reduction_order_tolerance(NUM_TERMS, scale),
        err_msg=f"gradient{key}; max |gradient| {scale:.3g}; a row permutation on one"
        f" device moves gradients by up to {floor:.3g}",
    )


def test_updated_params_match_one_device(run):
  _, results = run
  bad = _mismatches(results, "8")
  assert not [b for b in bad if b.startswith("['params']")], bad
  # The step did move the parameters, so the equality is not trivial.
  pairs = _pairs(results, "params")
  moved = [key for key, a, _ in pairs if not np.array_equal(a, results[f"init/params{key}"])]
  assert len(moved) > 0.9 * len(pairs), f"only {len(moved)} of {len(pairs)} leaves moved"


def test_batch_stats_are_over_the_global_batch(run):
  _, results = run
  bad = _mismatches(results, "8")
  assert not [b for b in bad if b.startswith("['batch_stats']")], bad
  # Per-device statistics (2 rows) would be far from the global ones: the
  # comparison above is sensitive to the difference it is about.
  pairs = _pairs(results, "batch_stats")
  near = [
      key
      for key, a, _ in pairs
      if np.allclose(a, results[f"local/batch_stats{key}"], rtol=1e-3, atol=1e-4)
  ]
  assert not near, f"per-device BatchNorm statistics equal the global ones: {near}"


def test_the_comparisons_catch_a_shard_counted_twice(run):
  """The derived tolerances are no blanket: device 0's rows fed to device 1
  as well (device 1's dropped) fail them, in the parameters and the BatchNorm
  statistics alike."""
  _, results = run
  bad = _mismatches(results, "doubled")
  # The stem's kernel, whose gradient is the largest sum the tolerance is
  # sized for, is among the leaves caught (28x over, on the machine where
  # this was written, with 2 of 16 rows wrong), as are BatchNorm statistics.
  assert any(b.startswith("['params']['encoder']['conv1']['kernel']") for b in bad), bad
  assert any(b.startswith("['batch_stats']") for b in bad), bad


def test_folds_trained_together_equal_folds_trained_apart(run):
  """config.parallel_folds: F fold models in one vmapped step, batch sharded over
  8 devices, give each fold's own training on 1 device (loss, params, BatchNorm
  statistics; SGD, float32)."""
  from tests.conftest import reduction_order_tolerance, step_mismatches

  _, results = run
  for way in ("together", "in_turn"):  # config.fold_strategy 'vmap' and 'in_turn'
    for f in range(2):
      for t in range(FOLD_STEPS):
        a, b = results[f"{way}/loss/{t}"][f], results[f"apart{f}/loss/{t}"]
        np.testing.assert_allclose(
            a,
            b,
            rtol=0,
            atol=reduction_order_tolerance((t + 1) * NUM_TERMS, abs(float(b))),
            err_msg=f"{way}: fold {f} step {t} loss",
        )
      # Parameters and BatchNorm statistics after FOLD_STEPS steps: each step
      # may add what reduction order allows (tests.conftest.step_mismatches).
      bad = step_mismatches(
          _step(results, f"{way}{f}"),
          _step(results, f"apart{f}"),
          _step(results, "init"),
          NUM_TERMS,
          steps=FOLD_STEPS,
      )
      assert not bad, f"{way}: fold {f}: " + "\n".join(bad)
  # The two folds saw different data: their models differ.
  differ = [
      k
      for k in results
      if k.startswith("apart0/params")
      and not np.allclose(results[k], results["apart1" + k[len("apart0") :]])
  ]
  assert differ


def test_one_fold_is_traced_without_vmap_and_equals_it():
  """steps.over_folds: F fold models through `jax.vmap`, one fold through the
  function itself (no batched tracing, no grouped convs), with the same
  result as vmap: a conv with per-fold weights, against each fold's conv."""
  import jax
  import jax.numpy as jnp
  from saltjax.training import steps

  seen = []

  def conv(weights, images):
    seen.append(type(images).__name__)
    out = jax.lax.conv_general_dilated(
        images, weights, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return {"out": out, "total": jnp.sum(out)}

  rng = np.random.default_rng(0)
  weights = rng.normal(size=(2, 3, 3, 2, 4)).astype(np.float32)
  images = rng.normal(size=(2, 5, 8, 8, 2)).astype(np.float32)
  fn = jax.jit(steps.over_folds(conv))
  together = fn(weights, images)
  one = fn(weights[:1], images[:1])
  assert "BatchTracer" in seen[0] and "BatchTracer" not in seen[1], seen
  for f in range(2):
    alone = jax.jit(conv)(weights[f], images[f])
    for key in ("out", "total"):
      np.testing.assert_allclose(together[key][f], alone[key], rtol=1e-5, atol=1e-5)
  assert one["out"].shape == (1, 5, 8, 8, 4) and one["total"].shape == (1,)
  np.testing.assert_array_equal(one["out"][0], jax.jit(conv)(weights[0], images[0])["out"])
  # The folds in turn inside the program: the same, fold by fold.
  in_turn = jax.jit(steps.over_folds(conv, "in_turn"))(weights, images)
  for key in ("out", "total"):
    np.testing.assert_allclose(in_turn[key], together[key], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ configs/tpu ---


def test_tpu_config_loads_and_divides_over_pod_slices():
  from configs import tpu
  from saltjax.app import config_checks

  config = tpu.get_config()
  config_checks.check(config)
  assert config.distributed is True
  assert config.compilation_cache
  assert config.model.dtype == "bfloat16"
  # Every slice from a v4-8 / v5e-8 up to 256 chips splits each batch evenly.
  for devices in (8, 16, 32, 64, 128, 256):
    for option, size in (
        ("batch_size", config.batch_size),
        ("eval_batch_size", config.eval_batch_size),
        ("predict.batch_size", config.predict.batch_size),
    ):
      assert size % devices == 0, f"config.{option}={size} over {devices} devices"
  # The learning rate grew with the batch, from the seed's.
  from configs import fold

  seed = fold.get_config()
  assert config.batch_size > seed.batch_size
  assert config.optimizer.learning_rate > seed.optimizer.learning_rate
  assert config.schedule.min_lr <= config.optimizer.learning_rate


if __name__ == "__main__":
  sys.path.insert(0, str(REPO))
  _worker(sys.argv[1])

"""The epoch as few programs as the input path allows.

On the device input path an epoch is one jitted program (a `lax.scan` over
its steps, then validation, best-model selection and the weight average);
these tests check that it computes what the step-by-step loop computes, that
the model choices at the epoch's end follow their definitions, and that the
training loop dispatches one program an epoch, not one a step.
"""

import dataclasses

import numpy as np
import pytest

from tests.conftest import tiny_config

FOLDS = [0, 1]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
  import jax

  from saltjax.data import dataset as data_lib
  from saltjax import parallel
  from saltjax.app import process
  from saltjax.training import feeders
  from saltjax.training.job import Job

  cache = str(tmp_path_factory.mktemp("epoch_program_cache"))
  config = tiny_config(
      cache,
      str(tmp_path_factory.mktemp("epoch_program_jax_cache")),
      input_pipeline="device",
      use_tfds=False,
      swa_from_epoch=1,
      **{
          # SGD: the update is linear in the gradient, so float32 summation
          # order stays at rounding level (Adam's first step is sign-like).
          "optimizer.name": "sgd",
          "synthetic.num_train": 40,
          "model.dtype": "float32",
      },
  )
  process.enable_compilation_cache(config)
  data = data_lib.load(config)
  fold_of = data_lib.fold_assignment(config, data)["fold"].to_numpy()
  mesh = parallel.create_mesh()
  job = Job.create(config, mesh, fold_of, writer=None)
  feeder = feeders.DeviceFeeder(config, data, fold_of, FOLDS, None, mesh, job.steps_per_epoch)
  repl = parallel.replicated(mesh)
  val = feeders.validation_data(config, data, FOLDS, fold_of, mesh)
  counts = jax.device_put(np.array([(fold_of == k).sum() for k in FOLDS], np.float32), repl)
  return config, data, fold_of, mesh, job, feeder, val, counts


def _fresh(job, mesh, best_scores):
  import jax

  from saltjax import parallel
  from saltjax.training.state import model_variables, stack_folds
  from saltjax.training.steps import ModelsInMemory

  repl = parallel.replicated(mesh)
  state = jax.device_put(stack_folds([job.new_state() for _ in FOLDS]), repl)
  variables = jax.device_get(model_variables(state))
  zeros = jax.tree.map(np.zeros_like, variables)
  models = ModelsInMemory(
      best=jax.device_put(zeros, repl),
      best_scores=jax.device_put(np.asarray(best_scores, np.float32), repl),
      swa=jax.device_put(zeros, repl),
  )
  return state, models


def _flat(state, losses) -> dict:
  """{"['params']...": array, "['batch_stats']...": array, "loss": array} on the host."""
  from saltjax.training.state import model_variables
  from tests.conftest import flat_leaves

  return {**flat_leaves(model_variables(state)), "loss": np.asarray(losses)}


def test_the_epoch_program_equals_the_step_by_step_loop(setting):
  """Same batches and updates: the programs differ only in how XLA orders the
  float32 sums, so they agree within what summation order can change
  (`conftest.step_mismatches`: tolerances derived from the batch's pixel count)."""
  import jax

  from tests.conftest import step_mismatches

  config, _, _, mesh, job, feeder, val, counts = setting
  epoch, name = 1, config.loss.name
  scalars = (np.int32(epoch), np.float32(0), np.bool_(True))

  state, models = _fresh(job, mesh, [-1.0, -1.0])
  init = _flat(state, np.zeros(()))
  state, models, metrics, sums, improved = job.device_epoch_program(name)(
      state, models, feeder.data, feeder.folds, val, counts, *scalars
  )
  one_program = jax.device_get((state, metrics, sums, improved))

  state, models = _fresh(job, mesh, [-1.0, -1.0])
  losses = []
  for batch in feeder.epoch(epoch):  # the same batches, made one step at a time
    state, step_metrics = job.train_steps[name](state, batch)
    losses.append(step_metrics["loss"])
  models, sums, improved = job.epoch_end_program()(state, models, val, counts, *scalars[1:])
  by_step = jax.device_get((state, np.stack(losses), sums, improved))

  steps = job.steps_per_epoch
  assert one_program[1]["loss"].shape == (steps, len(FOLDS))
  assert int(one_program[0].step[0]) == steps
  pixels = config.batch_size * config.image_size**2
  bad = step_mismatches(
      _flat(one_program[0], one_program[1]["loss"]),
      _flat(by_step[0], by_step[1]),
      init,
      num_terms=pixels,
      steps=steps,
  )
  assert not bad, bad
  # Validation: per-fold means of per-image scores and IoUs in [0, 1]. Weights
  # equal to rounding can still flip a pixel whose probability is 0.5 and so
  # move an image's IoU by 1 / its union: means within 0.01, not to the bit.
  held_out = np.asarray(jax.device_get(counts))[:, None]
  np.testing.assert_allclose(one_program[2] / held_out, by_step[2] / held_out, atol=0.01)
  np.testing.assert_array_equal(one_program[3], by_step[3])


def test_epoch_end_keeps_the_better_model_and_averages_the_weights(setting):
  """Fold 0's best already scores 2 (above any score, at most 1): it stays;
  fold 1's (-1) is replaced. With a weight average of zeros counting one
  model so far, the new average is half the model."""
  import jax

  from saltjax.training.state import model_variables

  _, _, _, mesh, job, _, val, counts = setting
  state, models = _fresh(job, mesh, [2.0, -1.0])
  variables = jax.device_get(model_variables(state))
  models, sums, improved = job.epoch_end_program()(
      state, models, val, counts, np.float32(1), np.bool_(True)
  )
  models, sums, improved = jax.device_get((models, sums, improved))
  np.testing.assert_array_equal(improved, [False, True])
  scores = sums[:, 0] / np.asarray(jax.device_get(counts))
  assert np.all((0 <= scores) & (scores <= 1))
  np.testing.assert_array_equal(models.best_scores, [2.0, scores[1]])
  for best, new, swa in zip(
      jax.tree.leaves(models.best), jax.tree.leaves(variables), jax.tree.leaves(models.swa)
  ):
    np.testing.assert_array_equal(best[0], np.zeros_like(best[0]))
    np.testing.assert_array_equal(best[1], new[1])
    np.testing.assert_allclose(swa, new / 2, rtol=1e-6)


def test_training_dispatches_one_program_an_epoch(setting, tmp_path, monkeypatch):
  """The loop runs each epoch as one program and never falls back to making
  batches one step at a time (the per-step batch function is not called in an epoch);
  `profile_epoch` traces the epoch it names."""
  from saltjax.training import feeders
  from saltjax.training import loop

  config, data, fold_of, _, job, _, _, _ = setting
  config = config.copy_and_resolve_references()
  config.profile_epoch = 2  # read by the loop, not by the programs: the job's programs serve
  job = dataclasses.replace(job, config=config)
  before = {name: p.calls for name, p in job.programs.items()}

  # The weight average's BatchNorm statistics are recomputed after training
  # from batches made on the host; within an epoch, none may be.
  in_epoch, run_epoch, per_step = [False], loop._run_epoch, feeders.DeviceFeeder.epoch

  def epoch(*args, **kwargs):
    in_epoch[0] = True
    try:
      return run_epoch(*args, **kwargs)
    finally:
      in_epoch[0] = False

  def batches(*args, **kwargs):
    assert not in_epoch[0], "the loop made a batch outside the epoch program"
    return per_step(*args, **kwargs)

  monkeypatch.setattr(loop, "_run_epoch", epoch)
  monkeypatch.setattr(feeders.DeviceFeeder, "epoch", batches)
  summaries = loop.train_folds(job, tmp_path, FOLDS, data, fold_of)
  assert [len(s["history"]) for s in summaries] == [config.num_epochs] * 2
  calls = {name: p.calls - before.get(name, 0) for name, p in job.programs.items()}
  calls = {name: n for name, n in calls.items() if n}
  assert calls == {f"the epoch on the device ({config.loss.name})": config.num_epochs}, calls
  assert all(len(p._compiled) == 1 for p in job.programs.values())
  assert all(h["images_per_second"] > 0 for s in summaries for h in s["history"])
  # config.profile_epoch: a jax.profiler trace of epoch 2 for TensorBoard's profile plugin.
  traces = list((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0

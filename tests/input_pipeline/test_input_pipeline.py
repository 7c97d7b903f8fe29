"""The tf.data pipeline: sizes, the inverse back to 101x101, seeded augmentation."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from saltjax.input_pipeline import tfdata_augment
from saltjax.input_pipeline import tfdata
from saltjax import geometry


def test_pad_then_crop_is_identity():
  image = np.random.default_rng(0).random((101, 101, 1)).astype(np.float32)
  padded = tfdata.to_model_size(tf.constant(image), 128, "pad").numpy()
  assert padded.shape == (128, 128, 1)
  # reflect padding: 13 rows before, 14 after; row 12 mirrors row 14 of the original
  np.testing.assert_array_equal(padded[13:114, 13:114], image)
  np.testing.assert_array_equal(padded[12, 13:114], image[1])
  back = geometry.to_original_size(jnp.asarray(padded[None, ..., 0]), "pad")
  np.testing.assert_array_equal(np.asarray(back[0]), image[..., 0])


def test_resize_round_trip_keeps_smooth_images():
  yy, xx = np.mgrid[0:101, 0:101] / 100.0
  image = (0.5 + 0.3 * np.sin(3 * xx) * np.cos(2 * yy)).astype(np.float32)
  up = tfdata.to_model_size(tf.constant(image[..., None]), 128, "resize").numpy()
  back = np.asarray(geometry.to_original_size(jnp.asarray(up[None, ..., 0]), "resize"))[0]
  assert back.shape == (101, 101)
  assert np.abs(back - image)[2:-2, 2:-2].max() < 0.01


def _bilinear_by_hand(a, out):
  """Separable bilinear resize of a (S, S) array with half-pixel centres,
  torch's align_corners=False without antialiasing, in float64."""

  def matrix(size_in):
    m = np.zeros((out, size_in))
    for i in range(out):
      src = (i + 0.5) * size_in / out - 0.5
      src = min(max(src, 0.0), size_in - 1.0)
      lo = int(np.floor(src))
      hi = min(lo + 1, size_in - 1)
      m[i, lo] += 1 - (src - lo)
      m[i, hi] += src - lo
    return m

  rows, cols = matrix(a.shape[0]), matrix(a.shape[1])
  return rows @ a.astype(np.float64) @ cols.T


@pytest.mark.parametrize("size", [128, 64])
def test_resize_back_is_plain_bilinear(size):
  # A noisy map is where an antialiasing (widened) kernel differs most.
  probs = np.random.default_rng(2).random((size, size)).astype(np.float32)
  back = geometry.to_original_size(jnp.asarray(probs[None]), "resize")
  np.testing.assert_allclose(
      np.asarray(back[0]), _bilinear_by_hand(probs, 101), rtol=1e-5, atol=1e-5
  )
  # ... the same rule as the forward resize (tf.image.resize, bilinear).
  forward = tf.image.resize(probs[..., None], [101, 101], "bilinear").numpy()[..., 0]
  np.testing.assert_allclose(np.asarray(back[0]), forward, rtol=1e-5, atol=1e-5)


def dataset(n=8):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (n, 101, 101), dtype=np.uint8)
  masks = np.zeros((n, 101, 101), np.uint8)
  masks[:, :, :30] = 1  # salt on the left
  return images, masks


def test_epochs_are_reproducible_and_differ():
  images, masks = dataset()
  for_epoch = tfdata.train_dataset(
      images,
      masks,
      batch_size=4,
      image_size=64,
      resize_mode="resize",
      augment_spec="hflip|shift(4)|brightness(0.1)",
      seed=3,
  )
  a = list(tfdata.epoch_iterator(for_epoch, 0))
  b = list(tfdata.epoch_iterator(for_epoch, 0))
  c = list(tfdata.epoch_iterator(for_epoch, 1))
  assert len(a) == 2 and a[0]["image"].shape == (4, 64, 64, 1) and a[0]["mask"].shape == (4, 64, 64)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  # skipping batches (resume mid-epoch) gives the same later batches
  skipped = list(tfdata.epoch_iterator(for_epoch, 0, skip_batches=1))
  np.testing.assert_array_equal(skipped[0]["image"], a[1]["image"])


def test_hflip_moves_image_and_mask_together():
  images, masks = dataset(1)
  image = tf.constant(images[0, ..., None] / 255.0, tf.float32)
  mask = tf.constant(masks[0, ..., None], tf.float32)
  ops = tfdata_augment.parse("hflip(1.0)")
  out_image, out_mask = tfdata_augment.apply(ops, image, mask, tf.constant([0, 0], tf.int64))
  np.testing.assert_array_equal(out_image.numpy(), image.numpy()[:, ::-1])
  assert out_mask.numpy()[:, -30:].all() and not out_mask.numpy()[:, :-30].any()


def test_unknown_augmentation_names_the_option():
  with pytest.raises(ValueError, match="config.augment"):
    tfdata_augment.parse("hflip|rotate(5)")


# ------------------------------------------- the F-fold training pipeline ---

SPEC = "hflip|shift(4)|brightness(0.1)"
OPTIONS = dict(batch_size=4, image_size=32, resize_mode="resize", augment_spec=SPEC)


def fold_examples(sizes=(13, 9, 11)):
  """Three folds of different sizes and different images."""
  rng = np.random.default_rng(4)
  return [(rng.integers(0, 256, (n, 101, 101), dtype=np.uint8), dataset(n)[1]) for n in sizes]


def expected_batch(examples, seed, epoch, step, batch_size=4, image_size=32):
  """Fold `seed`'s batch by its definition: a shuffle of the rows seeded by
  seed * 7919 + epoch, position p augmented with stateless seed (seed, epoch) * 1_000_003 + p."""
  images, masks = examples
  n = len(images)
  order = tf.data.Dataset.range(n).shuffle(
      n, seed=seed * 7_919 + epoch, reshuffle_each_iteration=False
  )
  order = list(order.as_numpy_iterator())
  ops = tfdata_augment.parse(SPEC)
  out_images, out_masks = [], []
  for p in range(step * batch_size, (step + 1) * batch_size):
    image = tf.constant(images[order[p], ..., None] / 255.0, tf.float32)
    mask = tf.constant(masks[order[p], ..., None], tf.float32)
    image, mask = tfdata_augment.apply(
        ops, image, mask, tf.constant([seed, epoch], tf.int64) * 1_000_003 + p
    )
    out_images.append(tf.image.resize(image, [image_size, image_size]).numpy())
    mask = tf.image.resize(mask, [image_size, image_size]).numpy()
    out_masks.append((mask[..., 0] >= 0.5).astype(np.float32))
  return np.stack(out_images), np.stack(out_masks)


def test_fold_batches_are_their_definition_and_shapes():
  examples = fold_examples()
  pipeline = tfdata.TrainPipeline(examples, [100, 101, 102], num_epochs=3, **OPTIONS)
  assert pipeline.steps_per_epoch == 9 // 4  # the smallest fold's whole batches
  batches = list(tfdata.epoch_iterator(pipeline, 1))
  assert len(batches) == 2
  for batch in batches:
    assert batch["image"].shape == (3, 4, 32, 32, 1) and batch["image"].dtype == np.float32
    assert batch["mask"].shape == (3, 4, 32, 32) and batch["mask"].dtype == np.float32
  for k in range(3):
    images, masks = expected_batch(examples[k], 100 + k, epoch=1, step=1)
    np.testing.assert_allclose(batches[1]["image"][k], images, atol=1e-6)
    np.testing.assert_array_equal(batches[1]["mask"][k], masks)


def test_fold_epochs_do_not_depend_on_the_group_or_the_start():
  examples = fold_examples()
  together = tfdata.TrainPipeline(examples, [100, 101, 102], num_epochs=4, **OPTIONS)
  epochs = [list(together.epoch(e)) for e in range(4)]
  # Folds 2 and 0 alone, resumed at epoch 2, given the same number of steps.
  apart = tfdata.TrainPipeline(
      [examples[2], examples[0]], [102, 100], steps_per_epoch=2, num_epochs=4, **OPTIONS
  )
  for e in (2, 3):
    for a, b in zip(apart.epoch(e), epochs[e], strict=True):
      np.testing.assert_array_equal(a["image"][0], b["image"][2])
      np.testing.assert_array_equal(a["image"][1], b["image"][0])
      np.testing.assert_array_equal(a["mask"][1], b["mask"][0])
  assert not np.array_equal(epochs[0][0]["image"], epochs[1][0]["image"])


def test_epochs_in_turn_read_on_from_one_iterator_and_trace_once():
  pipeline = tfdata.TrainPipeline(fold_examples(), [1, 2, 3], num_epochs=5, **OPTIONS)
  for e in range(3):
    for _ in pipeline.epoch(e):
      pass
  assert pipeline.iterators_started == 1
  assert dict(pipeline.traces) == {"epoch": 1, "example": 1}
  # Out of sequence (a resume, a repeated epoch): a new iterator of the same
  # dataset, still nothing traced again.
  first = next(pipeline.epoch(1))
  again = next(pipeline.epoch(1))
  np.testing.assert_array_equal(first["image"], again["image"])
  assert pipeline.iterators_started == 3
  assert dict(pipeline.traces) == {"epoch": 1, "example": 1}


def test_pipelines_run_no_autotuning_thread_that_deleting_them_would_wait_for():
  # An autotuned iterator's destructor joins its optimisation thread, which
  # sleeps up to 60 s at a time: the suite's workers stalled 54-104 s, no CPU
  # used, in that destructor when a finished run's pipeline was collected.
  pipeline = tfdata.TrainPipeline(fold_examples(), [1, 2, 3], num_epochs=2, **OPTIONS)
  assert pipeline.dataset.options().autotune.enabled is False


def test_hflip_flips_half_the_examples_and_masks_stay_binary():
  images, masks = dataset(40)  # salt on the left 30 of 101 columns: 16+ after shift and zoom
  examples = [(images, masks), (images[:36], masks[:36])]
  pipeline = tfdata.TrainPipeline(
      examples,
      [5, 6],
      batch_size=4,
      image_size=32,
      resize_mode="resize",
      augment_spec="hflip|shift(4)|scale(0.1)",
      num_epochs=3,
  )
  flipped = []
  for e in range(3):
    for batch in pipeline.epoch(e):
      mask = batch["mask"].reshape(-1, 32, 32)
      assert set(np.unique(mask)) <= {0.0, 1.0}
      left, right = mask[:, :, :4].mean((1, 2)), mask[:, :, -4:].mean((1, 2))
      assert ((left > 0.9) & (right < 0.1) | (left < 0.1) & (right > 0.9)).all()
      flipped.extend(right > left)
  assert len(flipped) == 3 * 2 * 36
  # 216 fair coin flips: 0.5 +- 4 standard deviations (0.034)
  assert abs(np.mean(flipped) - 0.5) < 0.14


def test_too_few_images_for_the_steps_names_the_option():
  with pytest.raises(tfdata.ConfigError, match="config.batch_size=4"):
    tfdata.TrainPipeline(fold_examples(), [1, 2, 3], steps_per_epoch=3, **OPTIONS)


def test_feeder_puts_two_batches_on_the_device_ahead_and_keeps_each_folds_data(monkeypatch):
  import ml_collections

  from saltjax import parallel
  from saltjax.training import feeders

  config = ml_collections.ConfigDict(
      dict(seed=3, num_epochs=3, batch_size=2, image_size=32, resize_mode="resize", augment=SPEC)
  )
  examples = fold_examples()
  mesh = parallel.create_mesh()
  feeder = feeders.TfDataFeeder(config, [examples[0], examples[2]], [0, 2], mesh, steps_per_epoch=5)
  pulled = []
  original = tfdata.epoch_iterator

  def counting(pipeline, epoch, skip_batches=0):
    for i, batch in enumerate(original(pipeline, epoch, skip_batches)):
      pulled.append((epoch, i))
      yield batch

  monkeypatch.setattr(tfdata, "epoch_iterator", counting)
  batches = feeder.epoch(1)
  first = next(batches)
  deadline = time.monotonic() + 10
  while len(pulled) < 3 and time.monotonic() < deadline:
    time.sleep(0.01)
  # While the first step runs, two more batches are on their way (one more may
  # wait in the feeder's thread), no more.
  assert pulled[:3] == [(1, 0), (1, 1), (1, 2)] and len(pulled) <= 4
  assert isinstance(first["image"], jax.Array)
  assert first["image"].sharding == parallel.data_sharding(mesh, fold_axis=True)
  assert first["image"].shape == (2, 2, 32, 32, 1) and first["mask"].shape == (2, 2, 32, 32)
  rest = list(batches)
  assert len(rest) == 4
  # Fold 2's slot: seed 3 * 100 + 2, as when it trains alone.
  images, masks = expected_batch(examples[2], 302, epoch=1, step=3, batch_size=2)
  np.testing.assert_allclose(np.asarray(rest[2]["image"][1]), images, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(rest[2]["mask"][1]), masks)
  # An epoch left early stops the feeder's thread; the next one starts afresh.
  batches = feeder.epoch(2)
  next(batches)
  batches.close()
  assert not [t for t in threading.enumerate() if t.name == "TfDataFeeder"]
  assert len(list(feeder.epoch(2))) == 5
  # The BatchNorm pass over fold 0 (slot 0): all of its whole batches, the
  # training epoch's first.
  fold_images = list(feeder.fold_epoch(0, 1))
  assert len(fold_images) == 13 // 2 and fold_images[0].shape == (2, 32, 32, 1)
  np.testing.assert_array_equal(np.asarray(fold_images[0]), np.asarray(first["image"][0]))
  # A failure making the batches reaches the train loop.

  def failing(pipeline, epoch, skip_batches=0):
    yield from original(pipeline, epoch, skip_batches)
    raise RuntimeError("disk gone")

  monkeypatch.setattr(tfdata, "epoch_iterator", failing)
  with pytest.raises(RuntimeError, match="disk gone"):
    list(feeder.epoch(0))


def test_every_op_of_every_example_draws_from_its_own_stream(monkeypatch):
  """Neighbouring examples' augmentations are independent: no two random draws
  of a batch, across ops and examples, share a stateless seed (distinct Philox
  keys give independent streams; equal keys give the same numbers)."""
  seeds = []

  def recording(fn, seed_arg):
    def wrapped(*args, **kwargs):
      seed = kwargs["seed"] if "seed" in kwargs else args[seed_arg]
      seeds.append(tuple(np.asarray(seed).tolist()))
      return fn(*args, **kwargs)

    return wrapped

  monkeypatch.setattr(tf.random, "stateless_uniform", recording(tf.random.stateless_uniform, 1))
  for name in ("stateless_random_crop", "stateless_random_brightness"):
    monkeypatch.setattr(tf.image, name, recording(getattr(tf.image, name), 2))
  monkeypatch.setattr(
      tf.image, "stateless_random_contrast", recording(tf.image.stateless_random_contrast, 3)
  )
  ops = tfdata_augment.parse("hflip|shift(4)|scale(0.1)|brightness(0.1)|contrast(0.1)")
  image = tf.zeros([101, 101, 1])
  for p in range(48):  # consecutive positions of one epoch, as TrainPipeline seeds them
    tfdata_augment.apply(ops, image, image, tf.constant([3, 0], tf.int64) * 1_000_003 + p)
  # hflip, shift's crop, scale's zoom and crop, brightness, contrast: 6 draws each.
  assert len(seeds) == 48 * 6
  assert len(set(seeds)) == len(seeds)

"""The tf.data pipeline: sizes, the inverse back to 101x101, seeded augmentation."""

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from saltjax import augment, input_pipeline


def test_pad_then_crop_is_identity():
  image = np.random.default_rng(0).random((101, 101, 1)).astype(np.float32)
  padded = input_pipeline.to_model_size(tf.constant(image), 128, "pad").numpy()
  assert padded.shape == (128, 128, 1)
  # reflect padding: 13 rows before, 14 after; row 12 mirrors row 14 of the original
  np.testing.assert_array_equal(padded[13:114, 13:114], image)
  np.testing.assert_array_equal(padded[12, 13:114], image[1])
  back = input_pipeline.to_original_size(jnp.asarray(padded[None, ..., 0]), "pad")
  np.testing.assert_array_equal(np.asarray(back[0]), image[..., 0])


def test_resize_round_trip_keeps_smooth_images():
  yy, xx = np.mgrid[0:101, 0:101] / 100.0
  image = (0.5 + 0.3 * np.sin(3 * xx) * np.cos(2 * yy)).astype(np.float32)
  up = input_pipeline.to_model_size(tf.constant(image[..., None]), 128, "resize").numpy()
  back = np.asarray(input_pipeline.to_original_size(jnp.asarray(up[None, ..., 0]), "resize"))[0]
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
  back = input_pipeline.to_original_size(jnp.asarray(probs[None]), "resize")
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
  for_epoch = input_pipeline.train_dataset(
      images,
      masks,
      batch_size=4,
      image_size=64,
      resize_mode="resize",
      augment_spec="hflip|shift(4)|brightness(0.1)",
      seed=3,
  )
  a = list(input_pipeline.epoch_iterator(for_epoch, 0))
  b = list(input_pipeline.epoch_iterator(for_epoch, 0))
  c = list(input_pipeline.epoch_iterator(for_epoch, 1))
  assert len(a) == 2 and a[0]["image"].shape == (4, 64, 64, 1) and a[0]["mask"].shape == (4, 64, 64)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  # skipping batches (resume mid-epoch) gives the same later batches
  skipped = list(input_pipeline.epoch_iterator(for_epoch, 0, skip_batches=1))
  np.testing.assert_array_equal(skipped[0]["image"], a[1]["image"])


def test_hflip_moves_image_and_mask_together():
  images, masks = dataset(1)
  image = tf.constant(images[0, ..., None] / 255.0, tf.float32)
  mask = tf.constant(masks[0, ..., None], tf.float32)
  ops = augment.parse("hflip(1.0)")
  out_image, out_mask = augment.apply(ops, image, mask, tf.constant([0, 0], tf.int64))
  np.testing.assert_array_equal(out_image.numpy(), image.numpy()[:, ::-1])
  assert out_mask.numpy()[:, -30:].all() and not out_mask.numpy()[:, :-30].any()


def test_unknown_augmentation_names_the_option():
  with pytest.raises(ValueError, match="config.augment"):
    augment.parse("hflip|rotate(5)")

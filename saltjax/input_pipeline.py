"""tf.data pipelines: 101x101 uint8 arrays in, model-sized float batches out.

Images enter the model at `image_size` (128 by default), either resized
(bilinear) or reflect-padded; predictions are brought back to 101x101 by the
inverse (see `to_original_size`). Training batches are shuffled and augmented
with stateless ops seeded by (seed, epoch), so the data order of any epoch
can be rebuilt exactly after a restart.
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from saltjax import augment

# TensorFlow only feeds data here: it must never take accelerator memory.
tf.config.set_visible_devices([], "GPU")
tf.config.set_visible_devices([], "TPU") if tf.config.list_physical_devices("TPU") else None

ORIGINAL_SIZE = 101


def pad_widths(image_size: int, original: int = ORIGINAL_SIZE) -> tuple[int, int]:
  """(before, after) padding that takes `original` to `image_size`."""
  total = image_size - original
  if total < 0:
    raise ValueError(f"image_size {image_size} is smaller than the images ({original})")
  return total // 2, total - total // 2


def to_model_size(image: tf.Tensor, image_size: int, mode: str,
                  method: str = "bilinear") -> tf.Tensor:
  """(H, W, C) or (B, H, W, C) float tensor at 101 -> `image_size`."""
  if mode == "resize":
    return tf.image.resize(image, [image_size, image_size], method)
  if mode == "pad":
    before, after = pad_widths(image_size)
    rank = len(image.shape)
    pads = [[0, 0]] * (rank - 3) + [[before, after], [before, after], [0, 0]]
    return tf.pad(image, pads, mode="REFLECT")
  raise ValueError(f"unknown config.resize_mode {mode!r}: use 'resize' or 'pad'")


def to_original_size(x: jnp.ndarray, mode: str) -> jnp.ndarray:
  """(B, S, S) model-size maps -> (B, 101, 101): the inverse of to_model_size."""
  if mode == "resize":
    # Plain bilinear (half-pixel centres), like the forward tf.image.resize:
    # antialiasing would widen the kernel by 128/101 and blur the map.
    return jax.image.resize(x, (x.shape[0], ORIGINAL_SIZE, ORIGINAL_SIZE), "linear",
                            antialias=False)
  before, _ = pad_widths(x.shape[1])
  return x[:, before:before + ORIGINAL_SIZE, before:before + ORIGINAL_SIZE]


def _as_float(images: np.ndarray) -> tf.Tensor:
  return tf.cast(images, tf.float32)[..., None] / 255.0


def train_dataset(images: np.ndarray, masks: np.ndarray, *, batch_size: int,
                  image_size: int, resize_mode: str, augment_spec: str,
                  seed: int) -> tf.data.Dataset:
  """The training set as a tf.data pipeline that yields one *epoch*.

  Call `epoch_iterator(ds, epoch)` to get the batches of a given epoch: the
  shuffle order and the augmentation of epoch e depend only on (seed, e).
  `batch_size` is the per-process batch; the last partial batch is dropped so
  that every step has the same shape (one compilation).
  """
  ops = augment.parse(augment_spec)
  base = tf.data.Dataset.from_tensor_slices((images, masks.astype(np.uint8))).cache()
  n = len(images)
  if n < batch_size:
    raise ValueError(
        f"only {n} training images for config.batch_size={batch_size} per process")

  def for_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
    epoch_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])

    def prepare(position, example):
      image, mask = example
      image = _as_float(image)
      mask = tf.cast(mask, tf.float32)[..., None]
      image, mask = augment.apply(ops, image, mask, epoch_seed * 1_000_003 + position)
      image = to_model_size(image, image_size, resize_mode)
      mask = to_model_size(mask, image_size, resize_mode)
      mask = tf.cast(mask >= 0.5, tf.float32)
      return {"image": image, "mask": mask[..., 0]}

    ds = base.shuffle(n, seed=seed * 7_919 + int(epoch), reshuffle_each_iteration=False)
    ds = ds.enumerate().map(prepare, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  return for_epoch


def epoch_iterator(for_epoch, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
  ds = for_epoch(epoch)
  if skip_batches:
    ds = ds.skip(skip_batches)
  return ds.as_numpy_iterator()


def inference_batches(images: np.ndarray, *, batch_size: int, image_size: int,
                      resize_mode: str) -> Iterator[tuple[dict, int]]:
  """Fixed-shape batches of `images` for prediction, as (batch, num_valid).

  The last batch is padded with zeros to `batch_size` so one compiled
  function serves every batch; `num_valid` says how many rows are real.
  """
  n = len(images)
  ds = tf.data.Dataset.from_tensor_slices(images)
  ds = ds.map(lambda im: to_model_size(_as_float(im), image_size, resize_mode),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  start = 0
  for batch in ds.as_numpy_iterator():
    valid = len(batch)
    if valid < batch_size:
      batch = np.concatenate(
          [batch, np.zeros((batch_size - valid,) + batch.shape[1:], batch.dtype)])
    yield {"image": batch}, valid
    start += valid
  assert start == n

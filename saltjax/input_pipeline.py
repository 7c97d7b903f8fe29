"""tf.data pipelines: 101x101 uint8 arrays in, model-sized float batches out.

Images enter the model at `image_size` (128 by default), either resized
(bilinear) or reflect-padded (`geometry` holds the sizes and the inverse,
`to_original_size`). Training batches are shuffled and augmented
with stateless ops seeded by (seed, epoch), so the data order of any epoch
can be rebuilt exactly after a restart.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import tensorflow as tf

from saltjax import augment
from saltjax import geometry
from saltjax.geometry import ORIGINAL_SIZE, pad_widths, to_original_size  # noqa: F401
from saltjax.errors import ConfigError


def to_model_size(
    image: tf.Tensor, image_size: int, mode: str, method: str = "bilinear"
) -> tf.Tensor:
  """(H, W, C) or (B, H, W, C) float tensor at 101 -> `image_size`."""
  if mode == "resize":
    return tf.image.resize(image, [image_size, image_size], method)
  if mode == "pad":
    before, after = geometry.pad_widths(image_size)
    rank = len(image.shape)
    pads = [[0, 0]] * (rank - 3) + [[before, after], [before, after], [0, 0]]
    return tf.pad(image, pads, mode="REFLECT")
  raise ConfigError(f"unknown config.resize_mode {mode!r}: use 'resize' or 'pad'")


def _as_float(images: np.ndarray) -> tf.Tensor:
  return tf.cast(images, tf.float32)[..., None] / 255.0


def train_dataset(
    images: np.ndarray,
    masks: np.ndarray,
    *,
    batch_size: int,
    image_size: int,
    resize_mode: str,
    augment_spec: str,
    seed: int,
) -> tf.data.Dataset:
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
    raise ConfigError(f"only {n} training images for config.batch_size={batch_size} per process")

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
    ds = ds.enumerate().map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  return for_epoch


def epoch_iterator(for_epoch, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
  ds = for_epoch(epoch)
  if skip_batches:
    ds = ds.skip(skip_batches)
  return ds.as_numpy_iterator()

"""tf.data pipelines: 101x101 uint8 arrays in, model-sized float batches out.

Images enter the model at `image_size` (128 by default), either resized
(bilinear) or reflect-padded (`geometry` holds the sizes and the inverse,
`to_original_size`). Training batches come from one `TrainPipeline` per run,
built once for all the folds trained together: a step's (F, B, ...) batch is
made by tf.data itself, and the epoch enters as data (the shuffle's seed and
the stateless augmentation ops are keyed on it), so no function is traced
again from one epoch to the next, and epoch e of fold k is a pure function of
(seed, k, e): any epoch can be rebuilt exactly after a restart.
"""

from __future__ import annotations

import collections
from typing import Iterator

import numpy as np
from saltjax.host_tensorflow import tf
from saltjax.input_pipeline import tfdata_augment
from saltjax import geometry
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


def _pipeline_options() -> tf.data.Options:
  """tf.data's autotuning off: no model thread that a deleted iterator must join.

  With autotuning on, every iterator runs an optimisation thread whose sleeps
  grow to 60 s, and the iterator's destructor joins it. A run's pipeline,
  garbage-collected later at whatever allocation came next, then held that
  thread (the training loop's, in a later fold or run) for up to a minute:
  54-104 s pauses with no CPU used, inside the iterator's destructor. Without
  autotuning, the map's AUTOTUNE parallelism is tf.data's default (the cores,
  at most 16) and prefetch(AUTOTUNE) sizes its buffer itself. On 2 cores this
  costs up to a fifth of the feeder's top rate, while the training loop's wait
  for input stays under 0.02 s an epoch (docs/input_pipelines.md).
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return options


def _as_float(images: np.ndarray) -> tf.Tensor:
  return tf.cast(images, tf.float32)[..., None] / 255.0


class TrainPipeline:
  """Training batches of F folds at once, from one tf.data pipeline built once.

  `examples` holds each fold's (images, masks): (N_k, 101, 101) uint8 arrays
  (this process's shard); `seeds` one seed per fold. Every epoch has
  `steps_per_epoch` steps (default: the smallest fold's N_k // batch_size);
  a step's batch is {"image": (F, B, S, S, 1), "mask": (F, B, S, S)} float32
  numpy arrays, without the F axis if `fold_axis` is False (then F == 1).

  Fold k's epoch e: its examples in the order of a shuffle seeded by
  seed_k * 7919 + e (the first steps * B of them), the example at position p
  augmented with the stateless seed (seed_k, e) * 1_000_003 + p. It does not
  depend on the other folds, on the start epoch or on how the epochs were
  iterated. The epochs are one tf.data stream: iterating epoch e, e + 1, ...
  in turn reads on from one iterator (tf.data prepares the next epoch's first
  batches while this one ends); any other epoch starts a new iterator of the
  same dataset, whose functions are not traced again (`traces` counts the
  traces of the per-epoch and per-example functions, `iterators_started` the
  iterators).
  """

  def __init__(
      self,
      examples: list[tuple[np.ndarray, np.ndarray]],
      seeds: list[int],
      *,
      batch_size: int,
      image_size: int,
      resize_mode: str,
      augment_spec: str,
      steps_per_epoch: int | None = None,
      num_epochs: int | None = None,
      fold_axis: bool = True,
  ):
    ops = tfdata_augment.parse(augment_spec)
    sizes = [len(images) for images, _ in examples]
    if len(seeds) != len(examples):
      raise ValueError(f"{len(seeds)} seeds for {len(examples)} folds")
    if not fold_axis and len(examples) != 1:
      raise ValueError("fold_axis=False needs exactly one fold")
    if min(sizes) < batch_size:
      raise ConfigError(
          f"only {min(sizes)} training images for config.batch_size={batch_size} per process"
      )
    steps = min(sizes) // batch_size if steps_per_epoch is None else steps_per_epoch
    if steps < 1 or min(sizes) < steps * batch_size:
      raise ConfigError(
          f"{steps} steps per epoch of config.batch_size={batch_size} per process need"
          f" {steps * batch_size} training images per fold; the smallest fold has {min(sizes)}"
      )
    self.steps_per_epoch, self.num_epochs = steps, num_epochs
    self.traces, self.iterators_started = collections.Counter(), 0
    folds = len(examples)
    per_step = folds * batch_size
    shape = ([folds] if fold_axis else []) + [batch_size, image_size, image_size]
    bases = [
        tf.data.Dataset.from_tensor_slices((images, masks.astype(np.uint8)))
        for images, masks in examples
    ]
    # The epochs to iterate: [first, last), read when an iterator starts.
    with tf.device("/CPU:0"):  # where tf.data runs, even if TensorFlow sees an accelerator
      self._first = tf.Variable(0, dtype=tf.int64, trainable=False)
      self._last = tf.Variable(0, dtype=tf.int64, trainable=False)

    def epoch_examples(epoch):
      """One epoch's examples, step by step: fold 0's B, fold 1's B, ..."""
      self.traces["epoch"] += 1
      per_fold = []
      for base, n, seed in zip(bases, sizes, seeds):
        order = base.shuffle(n, seed=seed * 7_919 + epoch, reshuffle_each_iteration=False)
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch]) * 1_000_003
        order = order.take(steps * batch_size).enumerate()
        order = order.map(lambda position, ex, s=epoch_seed: (s + position, *ex))
        per_fold.append(order.batch(batch_size))
      by_step = tf.data.Dataset.zip(tuple(per_fold))
      by_step = by_step.map(lambda *f: tuple(tf.concat(parts, 0) for parts in zip(*f)))
      return by_step.unbatch()

    def prepare(seed, image, mask):
      self.traces["example"] += 1
      image = _as_float(image)
      mask = tf.cast(mask, tf.float32)[..., None]
      image, mask = tfdata_augment.apply(ops, image, mask, seed)
      image = to_model_size(image, image_size, resize_mode)
      mask = to_model_size(mask, image_size, resize_mode)
      return image, tf.cast(mask >= 0.5, tf.float32)

    def to_step(images, masks):
      return {"image": tf.reshape(images, shape + [1]), "mask": tf.reshape(masks, shape)}

    epochs = tf.data.Dataset.range(1).flat_map(
        lambda _: tf.data.Dataset.range(self._first, self._last)
    )
    ds = epochs.flat_map(epoch_examples)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_step, drop_remainder=True).map(to_step)
    self.dataset = ds.prefetch(tf.data.AUTOTUNE).with_options(_pipeline_options())
    self._iterator = None
    self._position, self._stop = None, 0  # (epoch, step) of the next batch; its end epoch

  def _start(self, epoch: int) -> None:
    self._iterator = None  # the old one's last reads are done before the variables change
    last = epoch + 1 if self.num_epochs is None else max(self.num_epochs, epoch + 1)
    self._first.assign(epoch)
    self._last.assign(last)
    self._iterator = self.dataset.as_numpy_iterator()
    self.iterators_started += 1
    self._position, self._stop = (epoch, 0), last

  def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
    """The batches of `epoch` (numpy), from batch `skip_batches` on."""
    if self._position != (epoch, skip_batches) or epoch >= self._stop:
      self._start(epoch)
      for _ in range(skip_batches):
        next(self._iterator)
    for step in range(skip_batches, self.steps_per_epoch):
      batch = next(self._iterator)
      more = step + 1 < self.steps_per_epoch
      self._position = (epoch, step + 1) if more else (epoch + 1, 0)
      yield batch


def train_dataset(
    images: np.ndarray,
    masks: np.ndarray,
    *,
    batch_size: int,
    image_size: int,
    resize_mode: str,
    augment_spec: str,
    seed: int,
) -> TrainPipeline:
  """One fold's training set: batches of (B, S, S, 1) images and (B, S, S) masks.

  Call `epoch_iterator(pipeline, epoch)` to get the batches of a given epoch:
  the shuffle order and the augmentation of epoch e depend only on (seed, e).
  `batch_size` is the per-process batch; the last partial batch is dropped so
  that every step has the same shape (one compilation).
  """
  return TrainPipeline(
      [(images, masks)],
      [seed],
      batch_size=batch_size,
      image_size=image_size,
      resize_mode=resize_mode,
      augment_spec=augment_spec,
      fold_axis=False,
  )


def epoch_iterator(pipeline: TrainPipeline, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
  """The numpy batches of `epoch` (the train loop reads every epoch through here)."""
  return pipeline.epoch(epoch, skip_batches)

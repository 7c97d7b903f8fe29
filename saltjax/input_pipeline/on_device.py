"""The training input pipeline on the accelerator, in JAX: no TensorFlow.

The decoded 101x101 uint8 training images and masks sit on the device
(`put_on_device`); each step's batch is gathered and augmented there by a
pure, jittable function, so the host does no per-image work and a GPU that
takes thousands of images a second is never left waiting for tf.data (and a
machine without TensorFlow can train).

It computes what `saltjax.input_pipeline.tfdata` computes:
- the same augmentation ops (`saltjax.input_pipeline.augment_spec` names them; the JAX
  versions below draw their random numbers from the same distributions as
  `saltjax.input_pipeline.tfdata_augment`'s TensorFlow ones), then
- 101 -> image_size by `resize_mode`: 'resize' is TensorFlow's bilinear
  `tf.image.resize` (half-pixel centres, no antialiasing), 'pad' is reflect
  padding split as `pad_widths`; masks are re-binarised at 0.5.
The random streams differ from tf.data's (JAX keys, not TF seeds), so the
two pipelines give different but equally distributed epochs.

Determinism: a fold's epoch is a pure function of (fold key, epoch). The
order sorts the fold's rows by random keys drawn per row from
fold_in(order stream, epoch), so it does not depend on which folds (and so
which padded table length) the fold is trained with; example i of
the epoch is augmented with fold_in(fold_in(augment stream, epoch), i). The
fold key is jax.random.key(config.seed * 100 + fold), the seed the tf.data
pipeline gets. So any step of any epoch can be rebuilt after a restart.

How the train loop uses it (F folds at once, vmapped; F = 1 for one fold):

  data = on_device.put_on_device(images, masks, sharding=replicated)
  folds = on_device.fold_indices(fold_of, [0, 1, 2, 3, 4], seed=config.seed)
  steps = on_device.steps_per_epoch(folds, config.batch_size)
  batch_fn = on_device.make_train_batch_fn(config, config.batch_size)
  # batch_fn(data, folds, epoch, step) -> {"image": (F, B, S, S, 1), "mask": (F, B, S, S)}
  # Call it inside the jitted train step (fused), or jit it on its own:
  for batch in on_device.epoch_batches(jax.jit(batch_fn), data, folds, epoch, steps=steps):
    ...

Prediction needs no TensorFlow either: `saltjax.model.tta.make_infer_fn` resizes on
the device with `geometry`.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saltjax.input_pipeline import augment_spec
from saltjax import geometry
from saltjax import parallel
from saltjax.errors import ConfigError

ORIGINAL_SIZE = geometry.ORIGINAL_SIZE
# Independent random streams of a fold key.
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1

# An op maps (image (H, W), mask (H, W), key) to (image, mask), float32.
AugmentOp = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
_REGISTRY: dict[str, Callable[..., AugmentOp]] = {}


# ------------------------------------------------------ sizes and resampling ---

# The sizes live in `geometry`; these names stay for the pipeline's callers.
pad_widths = geometry.pad_widths
to_model_size = geometry.to_model_size
to_model_size_numpy = geometry.to_model_size_numpy
to_original_size = geometry.to_original_size


# --------------------------------------------------- augmentation ops (JAX) ---

register = augment_spec.registrar(_REGISTRY)


@register("hflip")
def hflip(p: float = 0.5) -> AugmentOp:
  """Horizontal flip with probability p."""

  def op(image, mask, key):
    flip = jax.random.uniform(key) < p
    return (jnp.where(flip, image[:, ::-1], image), jnp.where(flip, mask[:, ::-1], mask))

  return op


@register("vflip")
def vflip(p: float = 0.5) -> AugmentOp:
  """Vertical flip with probability p."""

  def op(image, mask, key):
    flip = jax.random.uniform(key) < p
    return (jnp.where(flip, image[::-1], image), jnp.where(flip, mask[::-1], mask))

  return op


@register("shift")
def shift(pixels: int = 8) -> AugmentOp:
  """A crop of the image reflect-padded by `pixels`, at a uniform offset.

  As TF's op: pad by `pixels` a side (REFLECT), then a random crop at
  offsets uniform in [0, 2 * pixels] on each axis independently.
  """

  def op(image, mask, key):
    offsets = jax.random.randint(key, (2,), 0, 2 * pixels + 1)
    # A padded copy and a dynamic slice: far cheaper than a gather on CPU.
    crop = lambda x: jax.lax.dynamic_slice(jnp.pad(x, pixels, mode="reflect"), offsets, x.shape)
    return crop(image), crop(mask)

  return op


@register("brightness")
def brightness(delta: float = 0.1) -> AugmentOp:
  """image + d, d ~ U[-delta, delta) (tf.image.stateless_random_brightness, no clip)."""

  def op(image, mask, key):
    return image + jax.random.uniform(key, (), minval=-delta, maxval=delta), mask

  return op


@register("contrast")
def contrast(delta: float = 0.1) -> AugmentOp:
  """(image - mean) * f + mean, f ~ U[1 - delta, 1 + delta) (tf.image.stateless_random_contrast)."""

  def op(image, mask, key):
    factor = jax.random.uniform(key, (), minval=1 - delta, maxval=1 + delta)
    mean = jnp.mean(image)
    return (image - mean) * factor + mean, mask

  return op


def zoom_crop(image, mask, sizes, offsets):
  """Pixels [offset, offset + n) of the input resized to `sizes`, per axis.

  What TF's scale op computes with a resize to `sizes` (image bilinear, mask
  nearest, half-pixel centres) and a crop at `offsets`; only the cropped
  pixels are sampled, so the shapes stay static while sizes are traced.
  """
  in_sizes = jnp.array(image.shape, jnp.float32)
  # Width first, then height, as in TF's bilinear kernel.
  for axis in (1, 0):
    n = image.shape[axis]
    ratio = in_sizes[axis] / jnp.asarray(sizes[axis]).astype(jnp.float32)
    out = (offsets[axis] + jnp.arange(n)).astype(jnp.float32) + 0.5
    image = geometry.lerp_axis(image, axis, *geometry.linear_taps(out * ratio - 0.5, n))
    # tf.image.resize 'nearest' (half-pixel centres): floor((y + 0.5) * ratio).
    nearest = jnp.clip(jnp.floor(out * ratio).astype(jnp.int32), 0, n - 1)
    mask = jnp.take(mask, nearest, axis=axis)
  return image, mask


@register("scale")
def scale(max_scale: float = 0.1) -> AugmentOp:
  """Zoom in by s ~ U[1, 1 + max_scale), cropping back to the input size.

  As TF's op: resize to round(101 * s), then a crop at offsets uniform in
  [0, size - 101] on each axis.
  """

  def op(image, mask, key):
    size_key, crop_key = jax.random.split(key)
    s = jax.random.uniform(size_key, (), minval=1.0, maxval=1.0 + max_scale)
    sizes = jnp.round(jnp.array(image.shape, jnp.float32) * s).astype(jnp.int32)
    offsets = jax.random.randint(crop_key, (2,), 0, sizes - jnp.array(image.shape) + 1)
    return zoom_crop(image, mask, sizes, offsets)

  return op


def parse(spec: str) -> list[AugmentOp]:
  """The JAX ops of a `config.augment` string; ValueError naming a bad op."""
  return [_REGISTRY[op.name](*op.args) for op in augment_spec.parse(spec)]


def apply(ops: Sequence[AugmentOp], image, mask, key):
  """Applies ops in turn, op i with fold_in(key, i)."""
  for i, op in enumerate(ops):
    image, mask = op(image, mask, jax.random.fold_in(key, i))
  return image, mask


# ------------------------------------------------------------------ batches ---


class DeviceData(NamedTuple):
  """The decoded dataset on the device: (N, 101, 101) uint8 images and masks in {0, 1}."""

  images: jax.Array
  masks: jax.Array


def put_on_device(images: np.ndarray, masks: np.ndarray, sharding=None) -> DeviceData:
  """Checks and places the uint8 arrays (replicated when `sharding` says so).

  Every process passes the same arrays: each device then holds the whole
  set (20 kB an image with its mask: 82 MB for the 4,000 Kaggle training
  images) and computes its own rows of every batch.
  """
  images, masks = np.asarray(images), np.asarray(masks)
  shape = (ORIGINAL_SIZE, ORIGINAL_SIZE)
  if images.ndim != 3 or images.shape[1:] != shape or images.dtype != np.uint8:
    raise ValueError(f"images must be (N, 101, 101) uint8, got {images.shape} {images.dtype}")
  if masks.shape != images.shape:
    raise ValueError(f"masks {masks.shape} do not match images {images.shape}")
  if masks.size and masks.max() > 1:
    raise ValueError("masks must hold 0 and 1 only")
  masks = masks.astype(np.uint8)
  if sharding is None:
    return DeviceData(jnp.asarray(images), jnp.asarray(masks))
  return DeviceData(*parallel.place_host_values((images, masks), sharding, "the images and masks"))


class FoldIndices(NamedTuple):
  """Each fold's training rows of the device data, padded to one length.

  rows: (F, n_max) int32, fold f's rows first (sizes[f] of them), then padding;
  sizes: (F,) int32; seeds: (F,) int32, each fold's key is jax.random.key(seed),
  seed = config.seed * 100 + fold (the tf.data pipeline's seed).
  """

  rows: jax.Array
  sizes: jax.Array
  seeds: jax.Array


def fold_indices(
    fold_of: np.ndarray,
    folds: Sequence[int],
    *,
    seed: int,
    num_extra: int = 0,
    extra_rows=None,
    sharding=None,
) -> FoldIndices:
  """The training rows of each of `folds` (every example whose fold differs).

  `num_extra` examples appended to the device data after the training set
  (pseudo-labels) join every fold's training side; `extra_rows` ({fold: rows
  of the device data}) instead gives each fold its own. With several
  processes, pass a replicated `sharding` (every process computes the same
  table).
  """
  fold_of = np.asarray(fold_of)
  extra = np.arange(len(fold_of), len(fold_of) + num_extra)
  rows = [
      np.concatenate(
          [np.flatnonzero(fold_of != f), extra, np.asarray((extra_rows or {}).get(f, []), np.int64)]
      )
      for f in folds
  ]
  sizes = np.array([len(r) for r in rows], np.int32)
  table = np.zeros((len(rows), sizes.max()), np.int32)
  for f, r in enumerate(rows):
    table[f, : len(r)] = r
  seeds = np.array([seed * 100 + f for f in folds], np.int32)
  if sharding is None:
    return FoldIndices(jnp.asarray(table), jnp.asarray(sizes), jnp.asarray(seeds))
  return FoldIndices(
      *parallel.place_host_values((table, sizes, seeds), sharding, "the folds' training rows")
  )


def steps_per_epoch(folds: FoldIndices, batch_size: int) -> int:
  """Full batches in an epoch of the smallest fold (the last partial one is dropped)."""
  smallest = int(np.min(np.asarray(folds.sizes)))
  if smallest < batch_size:
    raise ValueError(
        f"a fold has only {smallest} training images, fewer than" f" config.batch_size={batch_size}"
    )
  return smallest // batch_size


def epoch_order(rows: jax.Array, size, key: jax.Array, epoch) -> jax.Array:
  """One fold's rows in epoch `epoch`'s order, a function of (key, epoch) alone.

  The first `size` entries of `rows` are the fold's, the rest padding (the
  fold table is padded to the largest fold trained with it). Entry i gets a
  64-bit random sort key from fold_in(epoch key, i), which no other entry
  and no length enters; sorting by it (padding last, ties by position)
  leaves the fold's rows in a uniformly random order that is the same
  whatever the padding, so a fold gets the same batches alone as in any
  group. (A `jax.random.permutation` of the padded length would not: its
  order of the fold's rows changes with that length.)
  """
  epoch_key = jax.random.fold_in(jax.random.fold_in(key, _ORDER_STREAM), epoch)
  positions = jnp.arange(rows.shape[0])
  bits = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(epoch_key, i), (2,)))(positions)
  padding = (positions >= size).astype(jnp.uint32)
  # lexsort: the last key is the primary one.
  order = jnp.lexsort((positions, bits[:, 1], bits[:, 0], padding))
  return rows[order]


def example_keys(key: jax.Array, epoch, positions: jax.Array) -> jax.Array:
  """The augmentation key of each epoch position (fold key, epoch, position)."""
  epoch_key = jax.random.fold_in(jax.random.fold_in(key, _AUGMENT_STREAM), epoch)
  return jax.vmap(lambda p: jax.random.fold_in(epoch_key, p))(positions)


def make_batch_fn(*, augment: str, image_size: int, resize_mode: str) -> Callable:
  """fn(images, masks, rows, keys) -> {"image": (B,S,S,1), "mask": (B,S,S)}, pure.

  Gathers rows (B,) of the uint8 (N, 101, 101) arrays, augments example b
  with keys[b], then goes 101 -> image_size; float32 out, masks in {0, 1}.
  """
  ops = parse(augment)
  if resize_mode not in ("resize", "pad"):
    raise ConfigError(f"unknown config.resize_mode {resize_mode!r}: use 'resize' or 'pad'")

  def prepare(image, mask, key):
    image = image.astype(jnp.float32) / 255.0
    mask = mask.astype(jnp.float32)
    image, mask = apply(ops, image, mask, key)
    # On (H, W): a trailing channel axis of 1 makes XLA's CPU gathers slow.
    image = geometry.resample_to_model_size(image, image_size, resize_mode, jnp, axes=(0, 1))
    mask = geometry.resample_to_model_size(mask, image_size, resize_mode, jnp, axes=(0, 1))
    return image[..., None], (mask >= 0.5).astype(jnp.float32)

  def batch_fn(images, masks, rows, keys):
    image, mask = jax.vmap(prepare)(images[rows], masks[rows], keys)
    return {"image": image, "mask": mask}

  return batch_fn


def make_fold_batch_fn(config, batch_size: int) -> Callable:
  """fn(data, rows, size, seed, epoch, step) -> one fold's batch `step` of `epoch`.

  Pure and jittable (epoch and step may be traced). `step` must be below
  `steps_per_epoch`: inside jit a slice past the end is clamped, not refused.
  """
  batch_fn = make_batch_fn(
      augment=config.augment, image_size=config.image_size, resize_mode=config.resize_mode
  )

  def fold_batch(data: DeviceData, rows, size, seed, epoch, step):
    key = jax.random.key(seed)
    start = step * batch_size
    batch_rows = jax.lax.dynamic_slice(epoch_order(rows, size, key, epoch), (start,), (batch_size,))
    keys = example_keys(key, epoch, start + jnp.arange(batch_size))
    return batch_fn(data.images, data.masks, batch_rows, keys)

  return fold_batch


def make_train_batch_fn(config, batch_size: int) -> Callable:
  """fn(data, folds, epoch, step) -> {"image": (F,B,S,S,1), "mask": (F,B,S,S)}.

  Batch `step` of `epoch` for every fold of `folds` at once (vmapped over the
  fold axis); `batch_size` is the global batch of one fold.
  """
  fold_batch = jax.vmap(make_fold_batch_fn(config, batch_size), in_axes=(None, 0, 0, 0, None, None))

  def train_batch(data: DeviceData, folds: FoldIndices, epoch, step):
    return fold_batch(data, folds.rows, folds.sizes, folds.seeds, epoch, step)

  return train_batch


def epoch_batches(
    batch_fn: Callable,
    data: DeviceData,
    folds: FoldIndices,
    epoch: int,
    *,
    steps: int,
    start_step: int = 0,
) -> Iterator[dict]:
  """The batches of `epoch` from `start_step` on (resume mid-epoch), on the device.

  `batch_fn` is `make_train_batch_fn(...)`, usually jitted (with
  out_shardings to place the batch on a mesh). Nothing is synchronised:
  each call is dispatched asynchronously.
  """
  for step in range(start_step, steps):
    yield batch_fn(data, folds, epoch, step)

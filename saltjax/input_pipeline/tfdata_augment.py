"""A registry of small named augmentation ops, composed from a config string.

As in big_vision's preprocessing, a config says what happens to an image
without new code: ``"hflip|shift(8)|brightness(0.1)"``. Every op is a function
``(image, mask, seed) -> (image, mask)`` on float32 (H, W, 1) tensors using
TensorFlow's *stateless* random ops, so the same (seed, epoch, position)
always gives the same augmentation: runs are reproducible and resumable.

The spec string is read and checked by `saltjax.input_pipeline.augment_spec` (no
TensorFlow); `saltjax.input_pipeline.on_device` implements the same ops in JAX.
"""

from __future__ import annotations

from typing import Callable

from saltjax.host_tensorflow import tf
from saltjax.input_pipeline import augment_spec

AugmentOp = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
_REGISTRY: dict[str, Callable[..., AugmentOp]] = {}


register = augment_spec.registrar(_REGISTRY)


@register("hflip")
def hflip(p: float = 0.5) -> AugmentOp:
  """Horizontal flip: seismic sections are statistically left-right symmetric."""

  def op(image, mask, seed):
    flip = tf.random.stateless_uniform([], seed) < p
    return (
        tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image),
        tf.cond(flip, lambda: tf.reverse(mask, [1]), lambda: mask),
    )

  return op


@register("vflip")
def vflip(p: float = 0.5) -> AugmentOp:
  """Vertical flip (not physical for seismic, offered on request)."""

  def op(image, mask, seed):
    flip = tf.random.stateless_uniform([], seed) < p
    return (
        tf.cond(flip, lambda: tf.reverse(image, [0]), lambda: image),
        tf.cond(flip, lambda: tf.reverse(mask, [0]), lambda: mask),
    )

  return op


@register("shift")
def shift(pixels: int = 8) -> AugmentOp:
  """Random translation by up to `pixels`, reflect-padding the border."""

  def op(image, mask, seed):
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    pad = [[pixels, pixels], [pixels, pixels], [0, 0]]
    both = tf.concat([image, mask], -1)
    both = tf.pad(both, pad, mode="REFLECT")
    both = tf.image.stateless_random_crop(both, [h, w, 2], seed)
    return both[..., :1], both[..., 1:]

  return op


@register("brightness")
def brightness(delta: float = 0.1) -> AugmentOp:
  def op(image, mask, seed):
    return tf.image.stateless_random_brightness(image, delta, seed), mask

  return op


@register("contrast")
def contrast(delta: float = 0.1) -> AugmentOp:
  def op(image, mask, seed):
    return tf.image.stateless_random_contrast(image, 1 - delta, 1 + delta, seed), mask

  return op


@register("scale")
def scale(max_scale: float = 0.1) -> AugmentOp:
  """Random zoom-in by up to `max_scale`, cropping back to the input size."""

  def op(image, mask, seed):
    # Two streams split from the op's seed, as the device path's split keys:
    # `seed + 1` would be a neighbouring example's seed (seeds are consecutive
    # along the epoch), correlating one example's crop with the next's zoom.
    size_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    s = tf.random.stateless_uniform([], size_seed, 1.0, 1.0 + max_scale)
    size = tf.cast(tf.round(tf.cast(tf.stack([h, w]), tf.float32) * s), tf.int32)
    image = tf.image.resize(image, size, "bilinear")
    mask = tf.image.resize(mask, size, "nearest")
    both = tf.image.stateless_random_crop(tf.concat([image, mask], -1), [h, w, 2], crop_seed)
    return both[..., :1], both[..., 1:]

  return op


def parse(spec: str) -> list[AugmentOp]:
  """Parses ``"op|op(arg)|..."`` into ops; ValueError naming a bad op."""
  return [_REGISTRY[op.name](*op.args) for op in augment_spec.parse(spec)]


def apply(ops: list[AugmentOp], image, mask, seed):
  """Applies ops in turn, op i with fold_in(seed, i) (the device path's rule).

  Folding hashes the seed, so op i of one example and op j of another never
  share a stream: an offset such as seed + (0, 7919 i) would, wherever two
  examples' seeds differ by that offset.
  """
  for i, op in enumerate(ops):
    image, mask = op(image, mask, tf.random.experimental.stateless_fold_in(seed, i))
  return image, mask

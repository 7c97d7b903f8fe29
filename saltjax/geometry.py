"""Image sizes: the competition's 101x101 tiles and the model's input size.

Images enter the model at `image_size` (128 by default), either resized
(bilinear, half-pixel centres, no antialiasing: `tf.image.resize`'s taps and
rounding, so the TF pipeline and these agree) or reflect-padded; predictions
come back to 101x101 by the inverse. TensorFlow is not needed here: prediction
and the on-device input pipeline use these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from saltjax.errors import ConfigError

ORIGINAL_SIZE = 101  # the competition's tiles are 101x101 pixels
RESIZE_MODES = ("resize", "pad")


def pad_widths(image_size: int, original: int = ORIGINAL_SIZE) -> tuple[int, int]:
  """(before, after) padding that takes `original` to `image_size`."""
  total = image_size - original
  if total < 0:
    raise ValueError(f"image_size {image_size} is smaller than the images ({original})")
  return total // 2, total - total // 2


def linear_taps(src, in_size: int, xp=jnp):
  """TensorFlow's bilinear taps at source coordinates `src` (float32).

  As in TF's resize kernel: lower = max(floor, 0), upper = min(ceil, n - 1),
  weight = src - floor, so coordinates beyond an edge take the edge pixel.
  """
  floor = xp.floor(src)
  lower = xp.maximum(floor, 0).astype(np.int32)
  upper = xp.minimum(xp.ceil(src), in_size - 1).astype(np.int32)
  return lower, upper, src - floor


def lerp_axis(x, axis: int, lower, upper, weight, xp=jnp):
  """Linear interpolation along `axis` between the taps, as TF computes it."""
  a, b = xp.take(x, lower, axis=axis), xp.take(x, upper, axis=axis)
  shape = [1] * x.ndim
  shape[axis] = -1
  return a + (b - a) * weight.reshape(shape)


def resize_taps(in_size: int, out_size: int):
  """Static taps of a half-pixel bilinear resize (numpy, float32 as TF)."""
  ratio = np.float32(in_size) / np.float32(out_size)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * ratio - np.float32(0.5)
  return linear_taps(src, in_size, xp=np)


def resample_to_model_size(x, image_size: int, mode: str, xp, axes=(-3, -2)):
  """101 -> image_size along the two spatial `axes` of x."""
  h_axis, w_axis = (a % x.ndim for a in axes)
  if mode == "resize":
    # Width first, then height: the order of TF's kernel (same rounding).
    x = lerp_axis(x, w_axis, *resize_taps(x.shape[w_axis], image_size), xp=xp)
    return lerp_axis(x, h_axis, *resize_taps(x.shape[h_axis], image_size), xp=xp)
  if mode == "pad":
    before, after = pad_widths(image_size, x.shape[w_axis])
    pads = [(0, 0)] * x.ndim
    pads[h_axis] = pads[w_axis] = (before, after)
    return xp.pad(x, pads, mode="reflect")  # numpy's 'reflect' is TF's REFLECT
  raise ConfigError(f"unknown config.resize_mode {mode!r}: use 'resize' or 'pad'")


def to_model_size(x: jax.Array, image_size: int, mode: str) -> jax.Array:
  """(..., 101, 101, C) float -> (..., S, S, C): `input_pipeline.to_model_size` in JAX."""
  return resample_to_model_size(x, image_size, mode, jnp)


def to_model_size_numpy(x: np.ndarray, image_size: int, mode: str) -> np.ndarray:
  """The same on the host, in numpy (float32)."""
  return resample_to_model_size(np.asarray(x, np.float32), image_size, mode, np)


def to_original_size(x: jax.Array, mode: str) -> jax.Array:
  """(B, S, S) model-size maps -> (B, 101, 101): the inverse of to_model_size.

  No antialiasing, like the forward resize: the pair is then the same
  bilinear map both ways, and a constant or linear ramp survives the round trip.
  """
  if mode == "resize":
    return jax.image.resize(
        x, (x.shape[0], ORIGINAL_SIZE, ORIGINAL_SIZE), "linear", antialias=False
    )
  before, _ = pad_widths(x.shape[1])
  return x[:, before : before + ORIGINAL_SIZE, before : before + ORIGINAL_SIZE]

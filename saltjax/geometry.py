"""Image sizes: the competition's 101x101 tiles and the model's input size.

Images enter the model at `image_size` (128 by default), either resized
(bilinear, half-pixel centres, no antialiasing, as `tf.image.resize`) or
reflect-padded; predictions come back to 101x101 by the inverse. TensorFlow
is not needed here: prediction and the on-device input pipeline use these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ORIGINAL_SIZE = 101  # the competition's tiles are 101x101 pixels
RESIZE_MODES = ("resize", "pad")


def pad_widths(image_size: int, original: int = ORIGINAL_SIZE) -> tuple[int, int]:
  """(before, after) padding that takes `original` to `image_size`."""
  total = image_size - original
  if total < 0:
    raise ValueError(f"image_size {image_size} is smaller than the images ({original})")
  return total // 2, total - total // 2


def to_model_size(x: jax.Array, image_size: int, mode: str) -> jax.Array:
  """(B, 101, 101, C) float maps -> (B, S, S, C): what the model sees."""
  if mode == "resize":
    # Upsampling: antialiasing would not change anything, but say so.
    return jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[3]),
                            "linear", antialias=False)
  if mode == "pad":
    before, after = pad_widths(image_size, x.shape[1])
    return jnp.pad(x, ((0, 0), (before, after), (before, after), (0, 0)), mode="reflect")
  raise ValueError(f"unknown config.resize_mode {mode!r}: use 'resize' or 'pad'")


def to_original_size(x: jax.Array, mode: str) -> jax.Array:
  """(B, S, S) model-size maps -> (B, 101, 101): the inverse of to_model_size.

  No antialiasing, like the forward resize: the pair is then the same
  bilinear map both ways, and a constant or linear ramp survives the round trip.
  """
  if mode == "resize":
    return jax.image.resize(x, (x.shape[0], ORIGINAL_SIZE, ORIGINAL_SIZE), "linear",
                            antialias=False)
  before, _ = pad_widths(x.shape[1])
  return x[:, before:before + ORIGINAL_SIZE, before:before + ORIGINAL_SIZE]

"""The jitted forward pass used by validation and prediction: TTA and resize-back.

`make_infer_fn` returns a function of (variables, images) giving salt
probabilities at the original 101x101 size, averaged over the test-time
augmentations. Averaging happens on probabilities, as in the seed.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from saltjax import input_pipeline

TTA_CHOICES = ("none", "hflip", "vflip", "hflip+vflip", "shift", "hflip+shift")
_SHIFT = 4  # pixels, for the small-shift TTA


def _flip_at_original_size(flip):
  """`flip` of a reflect-padded model-size array, done on its 101x101 content.

  The padding is not symmetric (13 before, 14 after at 128): flipping the
  padded array would move the content to offset 14, one pixel off where
  training put it. So: crop the content, flip it, pad it again.
  """
  def flipped(x):
    before, after = input_pipeline.pad_widths(x.shape[1])
    content = input_pipeline.to_original_size(x, "pad")
    pads = [(0, 0), (before, after), (before, after)] + [(0, 0)] * (x.ndim - 3)
    return jnp.pad(flip(content), pads, mode="reflect")  # tf.pad's REFLECT
  return flipped


def _views(tta: str, resize_mode: str = "resize"):
  """(forward, inverse) pairs on (B, H, W, C) / (B, H, W) arrays at model size."""
  identity = (lambda x: x, lambda y: y)
  flip_w, flip_h = (lambda x: x[:, :, ::-1]), (lambda x: x[:, ::-1])
  if resize_mode == "pad":
    flip_w, flip_h = _flip_at_original_size(flip_w), _flip_at_original_size(flip_h)
  # A resize is symmetric (pixel centres at half-pixel offsets): flipping
  # before or after it is the same, so in 'resize' mode the views flip as is.
  hflip, vflip = (flip_w, flip_w), (flip_h, flip_h)

  def shift(dx):
    # Rolling with edge padding keeps the image statistics at the border.
    def fwd(x):
      pad = [(0, 0), (0, 0), (max(dx, 0), max(-dx, 0))] + [(0, 0)] * (x.ndim - 3)
      x = jnp.pad(x, pad, mode="edge")
      return x[:, :, max(-dx, 0):x.shape[2] - max(dx, 0)]
    def inv(y):
      pad = [(0, 0), (0, 0), (max(-dx, 0), max(dx, 0))]
      y = jnp.pad(y, pad, mode="edge")
      return y[:, :, max(dx, 0):y.shape[2] - max(-dx, 0)]
    return fwd, inv

  views = {"none": [identity], "hflip": [identity, hflip],
           "vflip": [identity, vflip], "hflip+vflip": [identity, hflip, vflip],
           "shift": [identity, shift(_SHIFT), shift(-_SHIFT)],
           "hflip+shift": [identity, hflip, shift(_SHIFT), shift(-_SHIFT)]}
  if tta not in views:
    raise ValueError(f"unknown config.predict.tta {tta!r}: use one of {', '.join(TTA_CHOICES)}")
  return views[tta]


def make_infer_fn(model, resize_mode: str, tta: str):
  """fn(variables, images (B,S,S,1)) -> {'probs': (B,101,101), 'class_probs'?: (B,)}."""
  views = _views(tta, resize_mode)

  def infer(variables, images):
    probs, class_probs = [], []
    for forward, inverse in views:
      out = model.apply(variables, forward(images), train=False)
      probs.append(inverse(jax.nn.sigmoid(out["logits"])))
      if "class_logits" in out:
        class_probs.append(jax.nn.sigmoid(out["class_logits"]))
    result = {"probs": input_pipeline.to_original_size(
        jnp.mean(jnp.stack(probs), 0), resize_mode)}
    if class_probs:
      result["class_probs"] = jnp.mean(jnp.stack(class_probs), 0)
    return result

  return infer

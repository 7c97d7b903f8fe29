"""The jitted forward pass of validation and prediction: TTA, sizes, batching.

`make_infer_fn` returns a function of (variables, uint8 101x101 images) giving
salt probabilities at 101x101, averaged over the test-time augmentations. Each
view is taken at 101x101, before the image goes to the model's size, so a
flip is the same flip whether the model input is resized or padded (a padded
128 image is not symmetric: 13 pixels before, 14 after). Averaging happens on
probabilities, as in the seed. No TensorFlow here.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from saltjax import geometry
from saltjax import parallel
from saltjax.errors import ConfigError

_SHIFT = 4  # pixels, for the small-shift TTA


def _shift(dx: int):
  """(forward, inverse) of a horizontal shift by dx, edge-padding the border."""

  def fwd(x):
    pad = [(0, 0), (0, 0), (max(dx, 0), max(-dx, 0))] + [(0, 0)] * (x.ndim - 3)
    x = jnp.pad(x, pad, mode="edge")
    return x[:, :, max(-dx, 0) : x.shape[2] - max(dx, 0)]

  def inv(y):
    pad = [(0, 0), (0, 0), (max(-dx, 0), max(dx, 0))]
    y = jnp.pad(y, pad, mode="edge")
    return y[:, :, max(dx, 0) : y.shape[2] - max(-dx, 0)]

  return fwd, inv


# (forward, inverse) pairs on (B, H, W, C) images / (B, H, W) maps.
_IDENTITY = (lambda x: x, lambda y: y)
_HFLIP = (lambda x: x[:, :, ::-1], lambda y: y[:, :, ::-1])
_VFLIP = (lambda x: x[:, ::-1], lambda y: y[:, ::-1])
# The one table of TTA choices (config.predict.tta): name -> views averaged.
TTA_VIEWS = {
    "none": [_IDENTITY],
    "hflip": [_IDENTITY, _HFLIP],
    "vflip": [_IDENTITY, _VFLIP],
    "hflip+vflip": [_IDENTITY, _HFLIP, _VFLIP],
    "shift": [_IDENTITY, _shift(_SHIFT), _shift(-_SHIFT)],
    "hflip+shift": [_IDENTITY, _HFLIP, _shift(_SHIFT), _shift(-_SHIFT)],
}
TTA_CHOICES = tuple(TTA_VIEWS)


def make_infer_fn(model, image_size: int, resize_mode: str, tta: str) -> Callable:
  """fn(variables, images uint8 (B,101,101)) -> {'probs': (B,101,101), 'class_probs'?: (B,)}."""
  if tta not in TTA_VIEWS:
    raise ConfigError(f"unknown config.predict.tta {tta!r}: use one of {', '.join(TTA_CHOICES)}")
  views = TTA_VIEWS[tta]

  def infer(variables, images):
    images = images.astype(jnp.float32)[..., None] / 255.0
    probs, class_probs = [], []
    for forward, inverse in views:
      x = geometry.to_model_size(forward(images), image_size, resize_mode)
      out = model.apply(variables, x, train=False)
      prob = geometry.to_original_size(
          jax.nn.sigmoid(out["logits"].astype(jnp.float32)), resize_mode
      )
      probs.append(inverse(prob))
      if "class_logits" in out:
        class_probs.append(jax.nn.sigmoid(out["class_logits"].astype(jnp.float32)))
    result = {"probs": jnp.mean(jnp.stack(probs), 0)}
    if class_probs:
      result["class_probs"] = jnp.mean(jnp.stack(class_probs), 0)
    return result

  return infer


def fixed_size_batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """(batch, num_valid) chunks of `images`, the last one zero-padded to batch_size.

  One compiled function then serves every batch; `num_valid` says how many
  rows are real.
  """
  for start in range(0, len(images), batch_size):
    batch = images[start : start + batch_size]
    valid = len(batch)
    if valid < batch_size:
      batch = np.concatenate(
          [batch, np.zeros((batch_size - valid,) + batch.shape[1:], batch.dtype)]
      )
    yield batch, valid


def predict_probs(
    infer_fn, variables, images: np.ndarray, *, batch_size: int, mesh, progress: str | None = None
) -> dict[str, np.ndarray]:
  """Probabilities at 101x101 for `images` (uint8, N x 101 x 101)."""
  outputs: dict[str, list] = {}
  bar = tqdm.tqdm(total=len(images), desc=progress, unit="img", disable=not progress, leave=False)
  for batch, valid in fixed_size_batches(np.asarray(images, np.uint8), batch_size):
    out = infer_fn(variables, parallel.global_from_replicated(batch, mesh))
    for k, v in out.items():
      outputs.setdefault(k, []).append(parallel.to_host(v)[:valid])
    bar.update(valid)
  bar.close()
  return {k: np.concatenate(v) for k, v in outputs.items()}


def progress_enabled(config) -> bool:
  """Progress bars: asked for, on a terminal, and on the first process only."""
  return bool(config.progress) and sys.stderr.isatty() and jax.process_index() == 0

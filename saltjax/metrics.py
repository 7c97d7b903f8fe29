"""The competition metric and other mask scores, in numpy (host) and JAX (device).

TGS Salt scoring: for each image, the mean over IoU thresholds
t in {0.50, 0.55, ..., 0.95} of [IoU > t]; an empty truth scores 1 for an empty
prediction and 0 otherwise, a non-empty truth scores 0 for an empty
prediction; the score is the mean over images.
"""

from __future__ import annotations

import numpy as np

# Thresholds as exact fractions k/20, so that "IoU > t" is decided in integers
# (an IoU of exactly 0.5 or 0.55 must not pass its own threshold).
_THRESHOLD_TWENTIETHS = np.arange(10, 20)
IOU_THRESHOLDS = _THRESHOLD_TWENTIETHS / 20.0


def _flat_bool(masks: np.ndarray) -> np.ndarray:
  masks = np.asarray(masks)
  if masks.ndim == 2:
    masks = masks[None]
  return masks.reshape(masks.shape[0], -1) != 0


def scores_from_counts(inter, union, xp=np):
  """(competition score, IoU) per image from its intersection and union pixel counts.

  `xp` is numpy or jax.numpy: the same rule scores out-of-fold predictions on
  the host and validates on the device without bringing masks back.
  """
  hits = 20 * inter[..., None] > xp.asarray(_THRESHOLD_TWENTIETHS) * union[..., None]
  empty = union == 0
  precision = xp.where(empty, 1.0, hits.mean(-1))
  iou = xp.where(empty, 1.0, inter / xp.maximum(union, 1))
  return precision, iou


def _counts(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  t, p = _flat_bool(truth), _flat_bool(pred)
  return (np.logical_and(t, p).sum(1).astype(np.int64), np.logical_or(t, p).sum(1).astype(np.int64))


def iou_per_image(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
  """IoU per image; 1.0 where both masks are empty."""
  return scores_from_counts(*_counts(truth, pred))[1]


def precision_per_image(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
  """The competition's per-image score (mean over IoU thresholds)."""
  return scores_from_counts(*_counts(truth, pred))[0]


def competition_score(truth: np.ndarray, pred: np.ndarray) -> float:
  """Mean over images of the competition's per-image score."""
  return float(precision_per_image(truth, pred).mean())


def coverage_class(masks: np.ndarray) -> np.ndarray:
  """Coverage class per mask: 0 when empty, else i with (i-1)/10 < cov <= i/10."""
  m = _flat_bool(masks)
  pixels, area = m.sum(1).astype(np.int64), m.shape[1]
  return -((-10 * pixels) // area)  # ceil(10 * pixels / area), exactly


def score_by_coverage_class(truth: np.ndarray, pred: np.ndarray) -> dict[int, dict]:
  """The competition score split by the truth's coverage class."""
  classes = coverage_class(truth)
  scores = precision_per_image(truth, pred)
  return {
      int(c): {"count": int((classes == c).sum()), "score": float(scores[classes == c].mean())}
      for c in np.unique(classes)
  }

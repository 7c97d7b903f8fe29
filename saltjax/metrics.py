"""The competition metric and other mask scores, in numpy.

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


def iou_per_image(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
  """IoU per image; 1.0 where both masks are empty."""
  t, p = _flat_bool(truth), _flat_bool(pred)
  inter = np.logical_and(t, p).sum(1)
  union = np.logical_or(t, p).sum(1)
  return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def precision_per_image(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
  """The competition's per-image score (mean over IoU thresholds)."""
  t, p = _flat_bool(truth), _flat_bool(pred)
  inter = np.logical_and(t, p).sum(1).astype(np.int64)
  union = np.logical_or(t, p).sum(1).astype(np.int64)
  hits = 20 * inter[:, None] > _THRESHOLD_TWENTIETHS[None, :] * union[:, None]
  return np.where(union == 0, 1.0, hits.mean(1))


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
  return {int(c): {"count": int((classes == c).sum()),
                   "score": float(scores[classes == c].mean())}
          for c in np.unique(classes)}

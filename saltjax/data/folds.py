"""Stratified K-fold assignment of the training ids."""

from __future__ import annotations

import numpy as np
from sklearn import model_selection

from saltjax import metrics
from saltjax.errors import DataError


def depth_class(depths: np.ndarray, num_bins: int = 10) -> np.ndarray:
  """Depth quantile bin per image, for stratifying by depth."""
  depths = np.asarray(depths, np.float64)
  edges = np.quantile(depths, np.linspace(0, 1, num_bins + 1)[1:-1])
  return np.searchsorted(edges, depths, side="right")


def assign_folds(
    masks: np.ndarray,
    num_folds: int,
    seed: int,
    depths: np.ndarray | None = None,
    stratify_by: str = "coverage",
) -> np.ndarray:
  """Returns the validation fold (0..num_folds-1) of every training image.

  Stratified on the coverage class (0 = empty, i = (i-1)/10 < cov <= i/10)
  with sklearn's StratifiedKFold, shuffled with `seed`; or on depth quantiles.
  """
  if num_folds < 2:
    raise ValueError(f"num_folds must be >= 2, got {num_folds}")
  if stratify_by == "coverage":
    classes = metrics.coverage_class(masks)
  elif stratify_by == "depth":
    if depths is None:
      raise ValueError("stratify_by='depth' needs depths")
    classes = depth_class(depths)
  else:
    raise ValueError(f"unknown fold stratification {stratify_by!r}: use 'coverage' or 'depth'")
  n = len(classes)
  if n < num_folds:
    raise DataError(f"{n} training images cannot make {num_folds} folds (config.num_folds)")
  # Classes rarer than num_folds cannot be spread over every fold: sklearn
  # would warn; merge them into their nearest populated neighbour instead.
  classes = _merge_rare_classes(classes, num_folds)
  splitter = model_selection.StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
  fold_of = np.empty(n, np.int64)
  for k, (_, val_idx) in enumerate(splitter.split(np.zeros(n), classes)):
    fold_of[val_idx] = k
  return fold_of


def _merge_rare_classes(classes: np.ndarray, min_count: int) -> np.ndarray:
  classes = classes.copy()
  while True:
    values, counts = np.unique(classes, return_counts=True)
    rare = values[counts < min_count]
    if len(rare) == 0 or len(values) == 1:
      return classes
    c = rare[0]
    others = values[values != c]
    classes[classes == c] = others[np.argmin(np.abs(others - c))]

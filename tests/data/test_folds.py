"""Stratified folds: every coverage class spread evenly over the folds."""

import numpy as np

from saltjax.data import folds
from saltjax import metrics


def make_masks(counts_per_class, seed=0):
  """Masks with a known number of images in each coverage class."""
  rng = np.random.default_rng(seed)
  masks = []
  for cls, count in enumerate(counts_per_class):
    for _ in range(count):
      m = np.zeros(101 * 101, np.uint8)
      if cls:
        lo, hi = (cls - 1) * 1021, min(cls * 1020, 10201)
        m[: rng.integers(lo + 1, hi + 1)] = 1
      masks.append(m.reshape(101, 101))
  return np.stack(masks)


def test_each_class_split_evenly_and_every_id_once():
  counts = [40, 20, 10, 10, 5, 5, 5, 5, 5, 5, 10]
  masks = make_masks(counts)
  classes = metrics.coverage_class(masks)
  assert np.bincount(classes, minlength=11).tolist() == counts
  fold_of = folds.assign_folds(masks, 5, seed=0)
  assert sorted(set(fold_of.tolist())) == [0, 1, 2, 3, 4]
  for cls, count in enumerate(counts):
    per_fold = np.bincount(fold_of[classes == cls], minlength=5)
    assert per_fold.max() - per_fold.min() <= 1, (cls, per_fold)


def test_seeded_and_deterministic():
  masks = make_masks([30, 10, 10, 0, 0, 0, 0, 0, 0, 0, 10])
  a = folds.assign_folds(masks, 5, seed=3)
  assert np.array_equal(a, folds.assign_folds(masks, 5, seed=3))
  assert not np.array_equal(a, folds.assign_folds(masks, 5, seed=4))


def test_rare_classes_do_not_break_the_split():
  masks = make_masks([20, 1, 0, 0, 0, 0, 0, 0, 0, 0, 9])  # class 1 has a single image
  fold_of = folds.assign_folds(masks, 3, seed=0)
  assert np.bincount(fold_of).tolist() == [10, 10, 10]


def test_by_depth():
  depths = np.arange(100)
  masks = np.zeros((100, 101, 101), np.uint8)
  fold_of = folds.assign_folds(masks, 4, seed=0, depths=depths, stratify_by="depth")
  # each depth decile contributes 2 or 3 ids to each fold
  for decile in range(10):
    per_fold = np.bincount(fold_of[decile * 10 : (decile + 1) * 10], minlength=4)
    assert per_fold.min() >= 2

"""The competition metric on hand-made cases, one per rule."""

import numpy as np
import pytest

from saltjax import metrics


def masks_with_iou(inter: int, union: int, size: int = 101):
  """Truth and prediction whose IoU is exactly inter / union."""
  truth = np.zeros((size, size), np.uint8)
  pred = np.zeros((size, size), np.uint8)
  flat_t, flat_p = truth.reshape(-1), pred.reshape(-1)
  only_truth = (union - inter) // 2
  only_pred = union - inter - only_truth
  flat_t[: inter + only_truth] = 1
  flat_p[:inter] = 1
  flat_p[inter + only_truth : inter + only_truth + only_pred] = 1
  return truth, pred


@pytest.mark.parametrize(
    "inter, union, expected",
    [
        (1, 1, 1.0),  # perfect
        (1, 2, 0.0),  # IoU exactly 0.5: "IoU > 0.5" fails, so 0
        (11, 20, 0.1),  # IoU exactly 0.55: passes 0.50 only
        (3, 5, 0.2),  # 0.60 exactly: passes 0.50, 0.55
        (3, 4, 0.5),  # 0.75 exactly: passes 0.50 .. 0.70
        (19, 20, 0.9),  # 0.95 exactly: passes all but 0.95
        (99, 100, 1.0),  # 0.99
        (2, 5, 0.0),  # 0.4
    ],
)
def test_iou_thresholds_are_strict(inter, union, expected):
  truth, pred = masks_with_iou(inter, union)
  assert metrics.iou_per_image(truth, pred)[0] == pytest.approx(inter / union)
  assert metrics.competition_score(truth, pred) == pytest.approx(expected)


def test_empty_cases():
  empty = np.zeros((101, 101), np.uint8)
  some = empty.copy()
  some[10, 10] = 1
  assert metrics.competition_score(empty, empty) == 1.0  # empty truth, empty pred
  assert metrics.competition_score(empty, some) == 0.0  # empty truth, any pred
  assert metrics.competition_score(some, empty) == 0.0  # salt missed entirely


def test_mean_over_images():
  empty = np.zeros((101, 101), np.uint8)
  t_half, p_half = masks_with_iou(3, 4)
  truth = np.stack([empty, t_half, empty, t_half])
  pred = np.stack([empty, p_half, t_half, empty])
  # per image: 1, 0.5, 0, 0
  assert metrics.competition_score(truth, pred) == pytest.approx(1.5 / 4)


def test_coverage_class_boundaries():
  area = 101 * 101

  def with_pixels(n):
    m = np.zeros(area, np.uint8)
    m[:n] = 1
    return m.reshape(101, 101)

  # class i holds (i-1)/10 < coverage <= i/10; 1020.1 pixels is 10%.
  cases = {0: 0, 1: 1, 1020: 1, 1021: 2, 5100: 5, 5101: 6, area - 1: 10, area: 10}
  got = metrics.coverage_class(np.stack([with_pixels(n) for n in cases]))
  assert got.tolist() == list(cases.values())


def test_score_by_coverage_class():
  empty = np.zeros((101, 101), np.uint8)
  full = np.ones((101, 101), np.uint8)
  split = metrics.score_by_coverage_class(
      np.stack([empty, full, full]), np.stack([empty, full, empty])
  )
  assert split == {0: {"count": 1, "score": 1.0}, 10: {"count": 2, "score": 0.5}}

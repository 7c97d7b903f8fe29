"""Scores of a section's mask against its known salt (saltjax/sections/truth_masks.py)."""

import numpy as np
import pytest

from saltjax.sections import truth_masks


def test_truth_scores_agree_with_a_hand_computation():
  # A 101 x 202 section is two tiles side by side.  Left: true salt in rows
  # 0-49 (5050 px), predicted in rows 0-39 (4040 px): IoU 0.8, which passes
  # the thresholds 0.50 ... 0.75 (6 of 10): tile score 0.6.  Right: no salt,
  # one false pixel: tile score 0.  Pixels: tp 4040, fp 1, fn 1010.
  truth = np.zeros((101, 202), np.uint8)
  truth[:50, :101] = 1
  pred = np.zeros_like(truth)
  pred[:40, :101] = 1
  pred[7, 150] = 1
  scores = truth_masks.truth_scores(truth, pred)
  assert scores["tiles"] == 2
  assert scores["competition_score"] == pytest.approx(0.3)
  assert scores["iou"] == pytest.approx(4040 / 5051)
  assert scores["precision"] == pytest.approx(4040 / 4041)
  assert scores["recall"] == pytest.approx(0.8)
  # Nothing predicted and nothing true: IoU 1, every tile scores 1, no precision/recall.
  empty = truth_masks.truth_scores(np.zeros((150, 150)), np.zeros((150, 150)))
  assert empty["iou"] == 1.0 and empty["competition_score"] == 1.0 and empty["tiles"] == 4
  assert empty["precision"] is None and empty["recall"] is None

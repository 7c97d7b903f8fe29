"""Run figures: each is a valid, reasonably sized PNG written atomically."""

import pathlib
import types

import cv2
from matplotlib import figure as mfigure
import numpy as np
import pytest

from saltjax import metrics
from saltjax import plots
from saltjax import prediction_plots


def read_png(path: pathlib.Path) -> np.ndarray:
  assert path.exists(), path
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert path.stat().st_size < 1_000_000, "PNG over 1 MB"
  image = cv2.imread(str(path))
  assert image is not None, f"{path} does not decode"
  return image


def assert_no_temporaries(workdir: pathlib.Path) -> None:
  leftovers = [p.name for p in workdir.iterdir() if p.name.startswith(".") or "tmp" in p.name]
  assert not leftovers, leftovers


def histories(num_folds=3, num_epochs=12, switch_at=9, seed=0):
  """Random-walk histories; cosine cycles of 4 epochs, a loss switch at switch_at."""
  rng = np.random.default_rng(seed)
  out = {}
  for fold in range(num_folds):
    records = []
    for epoch in range(1, num_epochs + 1):
      phase = ((epoch - 1) % 4 + 1) / 4
      records.append(
          {
              "epoch": epoch,
              "train_loss": float(1.3 / epoch + 0.05 * rng.random()),
              "val_score": float(0.3 + 0.04 * epoch + 0.03 * rng.normal()),
              "val_iou": float(0.35 + 0.04 * epoch + 0.03 * rng.normal()),
              "learning_rate": float(1e-5 + 1.5e-3 * (1 + np.cos(np.pi * phase))),
              "loss_name": "bce_dice" if epoch < switch_at else "lovasz",
              "seconds": 7.5,
          }
      )
    out[fold] = records
  return out


def blobs(num, seed=0, size=101):
  """Images and masks: a random disc of salt in most, some empty."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num, size, size), dtype=np.uint8)
  yy, xx = np.mgrid[:size, :size]
  masks = np.zeros((num, size, size), np.uint8)
  for i in range(num):
    if i % 4:
      cy, cx, r = rng.integers(10, 90), rng.integers(10, 90), rng.integers(4, 30)
      masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
  return images, masks


# ------------------------------------------------------------ selection ---


def test_select_examples_hand_made():
  scores = np.array([1.0, 0.9, 0.2, 1.0, 0.0, 0.5, 0.0])
  nonempty = np.array([False, True, True, True, False, True, True])
  best, worst = prediction_plots.select_examples(scores, nonempty, 2)
  # Best: the non-empty truths first (3 beats the empty 0, despite equal
  # scores); worst: lowest scores, the tie between 4 and 6 to the lower index.
  assert best.tolist() == [3, 1]
  assert worst.tolist() == [4, 6]


def test_select_examples_fills_best_with_empty_truths_and_stays_disjoint():
  scores = np.array([1.0, 0.3, 1.0, 0.0, 0.8])
  nonempty = np.array([False, True, False, False, False])
  best, worst = prediction_plots.select_examples(scores, nonempty, 2)
  assert best.tolist() == [1, 0]
  assert worst.tolist() == [3, 4]
  # Fewer than 2 * num images: split, best taking the odd one, no overlap.
  best, worst = prediction_plots.select_examples(scores, nonempty, 4)
  assert (len(best), len(worst)) == (3, 2)
  assert not set(best) & set(worst)
  assert sorted([*best, *worst]) == list(range(5))


def test_select_examples_tie_breaks():
  scores = np.array([1.0, 1.0, 1.0, 0.0, 0.0])
  nonempty = np.ones(5, bool)
  iou = np.array([0.97, 0.99, 0.97, 0.3, 0.0])
  coverage = np.array([0.98, 1.0, 0.45, 0.01, 0.02])
  best, worst = prediction_plots.select_examples(scores, nonempty, 2, iou=iou, coverage=coverage)
  # Among perfect scores, coverage nearest 50% first, then the higher IoU.
  assert best.tolist() == [2, 0]
  # Among zero scores, the lower IoU is worse.
  assert worst.tolist() == [4, 3]


def test_select_examples_empty():
  best, worst = prediction_plots.select_examples(np.zeros(0), np.zeros(0, bool), 8)
  assert best.size == 0 and worst.size == 0


def test_loss_stages():
  stages = plots.loss_stages(histories(num_folds=1, num_epochs=6, switch_at=4)[0])
  assert stages == [("bce_dice", 1, 3), ("lovasz", 4, 6)]


# -------------------------------------------------------------- figures ---


def test_training_curves(tmp_path):
  path = plots.write_training_curves(tmp_path, histories(), cycle_ends=[4, 8, 12])
  assert path == tmp_path / "training_curves.png"
  height, width, _ = read_png(path).shape
  assert 600 <= width <= 2000 and 600 <= height <= 2000
  assert_no_temporaries(tmp_path)


@pytest.mark.parametrize(
    "history",
    [
        {},  # nothing trained yet
        {"0": histories(num_folds=1, num_epochs=3, switch_at=99)[0]},  # JSON keys, one loss
    ],
)
def test_training_curves_degenerate(tmp_path, history):
  read_png(plots.write_training_curves(tmp_path, history, cycle_ends=[]))
  assert_no_temporaries(tmp_path)


def test_validation_grid(tmp_path):
  images, truth = blobs(20)
  probs = np.roll(truth, 3, axis=2).astype(np.float32) * 0.9
  pred = probs > 0.5
  scores = metrics.precision_per_image(truth, pred)
  path = prediction_plots.write_validation_grid(
      tmp_path, images, truth, probs, pred, scores, [f"id{i:02d}" for i in range(20)], num=4
  )
  assert path == tmp_path / "validation_examples.png"
  height, width, _ = read_png(path).shape
  assert 500 <= width <= 2000 and 500 <= height <= 2500
  assert_no_temporaries(tmp_path)


def test_threshold_sweep(tmp_path):
  sweep = [
      {"threshold": float(t), "score": float(0.8 - (t - 0.45) ** 2)}
      for t in np.arange(0.2, 0.81, 0.02)
  ]
  path = prediction_plots.write_threshold_sweep(tmp_path, sweep, 0.46, 20, final_score=0.81)
  assert path == tmp_path / "threshold_sweep.png"
  height, width, _ = read_png(path).shape
  assert 400 <= width <= 1500 and 300 <= height <= 1200
  # A fixed threshold off the sweep's grid, and no sweep at all, draw too.
  read_png(prediction_plots.write_threshold_sweep(tmp_path, sweep, 0.5, 0))
  read_png(prediction_plots.write_threshold_sweep(tmp_path, [], 0.5, 0))
  assert_no_temporaries(tmp_path)


def test_prediction_plots_pick_the_right_ids(tmp_path, monkeypatch):
  images, masks = blobs(12, seed=1)
  ids = [f"train{i:02d}" for i in range(12)]
  # Predicted out-of-fold: every other id.  Prediction = truth shifted by a
  # per-image amount, except one perfect and one completely missed case.
  rows = np.arange(0, 12, 2)
  oof_ids = [ids[i] for i in rows]
  truth = masks[rows]
  assert truth[1].any() and truth[3].any()
  oof_masks = np.stack([np.roll(m, k + 1, axis=1) for k, m in enumerate(truth)]) != 0
  oof_masks[1] = truth[1] != 0  # train02: perfect
  oof_masks[3] = False  # train06: salt missed entirely
  oof_masks[0] = True  # train00 (empty truth): salt everywhere
  drawn = []
  original = prediction_plots._draw_case
  monkeypatch.setattr(
      prediction_plots,
      "_draw_case",
      lambda ax, *args: (drawn.append(args[-1].split("\n")[0]), original(ax, *args)),
  )
  scores_json = {
      "threshold": 0.4,
      "min_area": 10,
      "oof_score": 0.5,
      "threshold_sweep": [{"threshold": 0.3, "score": 0.4}, {"threshold": 0.4, "score": 0.5}],
  }
  data = types.SimpleNamespace(train_ids=ids, train_images=images, train_masks=masks)
  paths = prediction_plots.write_prediction_plots(
      tmp_path, data, oof_ids, oof_masks * 0.9, oof_masks, scores_json, num=1
  )
  assert paths == [tmp_path / "validation_examples.png", tmp_path / "threshold_sweep.png"]
  for path in paths:
    read_png(path)
  # Best: the perfect non-empty case; worst: of the score-0 cases, the lowest
  # IoU (both 0) and then the lower index, i.e. train00's false positive.
  assert drawn == ["train02", "train00"]
  assert_no_temporaries(tmp_path)

  # A dict works as well as a SaltData; an id outside train_ids is an error.
  data = {"train_ids": ids, "train_images": images, "train_masks": masks}
  with pytest.raises(ValueError, match="not training ids"):
    prediction_plots.write_prediction_plots(
        tmp_path, data, ["nope"], oof_masks[:1] * 1.0, oof_masks[:1], scores_json
    )


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
  def broken_savefig(self, fname, **kwargs):
    pathlib.Path(fname).write_bytes(b"\x89PNG half")
    raise OSError("disk full")

  monkeypatch.setattr(mfigure.Figure, "savefig", broken_savefig)
  with pytest.raises(OSError, match="disk full"):
    prediction_plots.write_threshold_sweep(tmp_path, [], 0.5, 0)
  assert list(tmp_path.iterdir()) == []

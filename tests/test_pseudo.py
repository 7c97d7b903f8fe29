import numpy as np
import pytest

from saltjax import pseudo


def test_selects_images_outside_the_band():
  probs = np.full((3, 101, 101), 0.05, np.float32)
  probs[0, :10] = 0.95  # confident salt
  probs[1, :10] = 0.5  # 1010 uncertain pixels (~10%)
  probs[2, 0, :5] = 0.5  # 5 uncertain pixels (0.05%)
  chosen, masks = pseudo.select(probs, 0.2, 0.8, max_uncertain_fraction=0.001)
  assert chosen.tolist() == [0, 2]
  assert masks[0].sum() == 1010 and masks[1].sum() == 0


def test_bad_band():
  with pytest.raises(ValueError, match="band"):
    pseudo.select(np.zeros((1, 2, 2)), 0.8, 0.2, 0.0)


def test_each_folds_pseudo_labels_come_from_its_own_models(tmp_path, monkeypatch):
  """Fold k's second round learns only from fold k's first-round test predictions
  (models that never saw fold k's validation images): here fold 0's models are
  confident on every test image and fold 1's on none, so fold 0 gets every test
  image and fold 1 gets none, whatever the ensemble of both would say."""
  import types

  from configs import quick
  from saltjax import predict, run

  n_test = 4
  test_images = np.arange(n_test * 101 * 101, dtype=np.uint8).reshape(n_test, 101, 101)
  data = types.SimpleNamespace(test_images=test_images)
  confident = np.zeros((n_test, 101, 101), np.float32)
  confident[:, :50] = 0.99
  unsure = np.full((n_test, 101, 101), 0.5, np.float32)
  first = predict.Prediction(
      scores={"oof_score": 0.5},
      test_probs=(confident + unsure) / 2,
      fold_test_probs={0: confident, 1: unsure},
  )
  seen = {}

  def train_folds(config, workdir, data, fold_of, mesh, extra=None):
    seen.update(extra)
    return []

  def predict_and_submit(config, workdir, data=None, mesh=None):
    for name in ("submission.csv", "oof.csv"):
      (workdir / name).write_text(name)
    return predict.Prediction({"oof_score": 0.6}, None, {})

  monkeypatch.setattr(run, "train_folds", train_folds)
  monkeypatch.setattr(predict, "predict_and_submit", predict_and_submit)
  for name in ("submission.csv", "oof.csv", "scores.json"):
    (tmp_path / name).write_text("round 1")
  config = quick.get_config()
  config.num_folds = 2
  config.pseudo_label.enabled = True
  scores = run.pseudo_label_round(config, tmp_path, data, np.array([0, 1]), None, first)

  images0, masks0 = seen[0]
  np.testing.assert_array_equal(images0, test_images)
  np.testing.assert_array_equal(masks0, np.broadcast_to(confident > 0.5, masks0.shape))
  assert len(seen[1][0]) == 0
  assert scores["pseudo_label"]["num_images"] == {"0": n_test, "1": 0}
  assert "own" in scores["pseudo_label"]["labels_from"]
  assert (tmp_path / "round1_submission.csv").read_text() == "round 1"

import numpy as np
import pytest

from saltjax.training import pseudo_labels


def test_selects_images_outside_the_band():
  probs = np.full((3, 101, 101), 0.05, np.float32)
  probs[0, :10] = 0.95  # confident salt
  probs[1, :10] = 0.5  # 1010 uncertain pixels (~10%)
  probs[2, 0, :5] = 0.5  # 5 uncertain pixels (0.05%)
  chosen, masks = pseudo_labels.select(probs, 0.2, 0.8, max_uncertain_fraction=0.001)
  assert chosen.tolist() == [0, 2]
  assert masks[0].sum() == 1010 and masks[1].sum() == 0


def test_bad_band():
  with pytest.raises(ValueError, match="band"):
    pseudo_labels.select(np.zeros((1, 2, 2)), 0.8, 0.2, 0.0)


def test_each_folds_pseudo_labels_come_from_its_own_models(tmp_path, monkeypatch):
  """Fold k's second round learns only from fold k's first-round test predictions
  (models that never saw fold k's validation images): here fold 0's models are
  confident on every test image and fold 1's on none, so fold 0 gets every test
  image and fold 1 gets none, whatever the ensemble of both would say."""
  import types

  from configs import quick
  from saltjax.inference import predict
  from saltjax.app import job

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

  monkeypatch.setattr(job, "train_folds", train_folds)
  monkeypatch.setattr(predict, "predict_and_submit", predict_and_submit)
  for name in ("submission.csv", "oof.csv", "scores.json"):
    (tmp_path / name).write_text("round 1")
  (tmp_path / "folds.csv").write_text("id,fold\na,0\nb,1\n")  # the first round's split
  config = quick.get_config()
  config.num_folds = 2
  config.pseudo_label.enabled = True
  scores = job.pseudo_label_round(config, tmp_path, data, np.array([0, 1]), None, first)

  images0, masks0 = seen[0]
  np.testing.assert_array_equal(images0, test_images)
  np.testing.assert_array_equal(masks0, np.broadcast_to(confident > 0.5, masks0.shape))
  assert len(seen[1][0]) == 0
  assert scores["pseudo_label"]["num_images"] == {"0": n_test, "1": 0}
  assert "own" in scores["pseudo_label"]["labels_from"]
  assert (tmp_path / "round1_submission.csv").read_text() == "round 1"


def test_the_round_uses_the_parents_fold_split(tmp_path, monkeypatch):
  """pseudo_round/folds.csv is the first round's, byte for byte, and the round's
  training and out-of-fold prediction both use it, even where a fresh split of the
  same ids (what the round would compute on its own) differs."""
  import types

  import pandas as pd

  from configs import quick
  from saltjax.data import dataset as data_lib
  from saltjax.data import folds as folds_lib
  from saltjax.inference import predict
  from saltjax.app import job
  from saltjax.errors import WorkdirError

  config = quick.get_config()
  config.num_folds = 2
  config.pseudo_label.enabled = True
  n = 8
  data = types.SimpleNamespace(
      train_ids=[f"id{i}" for i in range(n)],
      train_masks=np.zeros((n, 101, 101), np.uint8),
      train_depths=np.arange(n, dtype=np.float64),
      test_images=np.zeros((2, 101, 101), np.uint8),
  )
  fresh = folds_lib.assign_folds(data.train_masks, 2, config.seed)
  parent = 1 - fresh  # another split of the same ids: what the parent run recorded
  frame = pd.DataFrame({"id": data.train_ids, "fold": parent, "coverage_class": 0, "depth": 0})
  frame.to_csv(tmp_path / "folds.csv", index=False)
  for name in ("submission.csv", "oof.csv", "scores.json"):
    (tmp_path / name).write_text("round 1")
  seen = {}

  def train_folds(config, workdir, data, fold_of, mesh, extra=None):
    seen["train"] = np.asarray(fold_of)
    return []

  def predict_and_submit(config, workdir, data=None, mesh=None):
    seen["predict"] = data_lib.folds_for_run(config, data, workdir)  # what predict reads
    for name in ("submission.csv", "oof.csv"):
      (workdir / name).write_text(name)
    return predict.Prediction({"oof_score": 0.6}, None, {})

  monkeypatch.setattr(job, "train_folds", train_folds)
  monkeypatch.setattr(predict, "predict_and_submit", predict_and_submit)
  unsure = np.full((2, 101, 101), 0.5, np.float32)
  first = predict.Prediction({"oof_score": 0.5}, unsure, {0: unsure, 1: unsure})
  job.pseudo_label_round(config, tmp_path, data, parent, None, first)

  round_dir = tmp_path / "pseudo_round"
  assert (round_dir / "folds.csv").read_bytes() == (tmp_path / "folds.csv").read_bytes()
  np.testing.assert_array_equal(seen["train"], parent)
  np.testing.assert_array_equal(seen["predict"], parent)

  # A round workdir holding another split is refused, naming both files.
  pd.DataFrame({"id": data.train_ids, "fold": fresh}).to_csv(round_dir / "folds.csv", index=False)
  with pytest.raises(WorkdirError, match="differs from") as raised:
    job.pseudo_label_round(config, tmp_path, data, parent, None, first)
  assert str(round_dir / "folds.csv") in str(raised.value)


def test_steps_per_epoch_with_pseudo_labels_fit_every_host(monkeypatch):
  """4 hosts, folds of 10 training images plus 10 pseudo-labels each, one image
  per host and step: each host feeds 10 // 4 + 10 // 4 = 4 of its own images
  (the two are sharded apart), so an epoch is 4 steps, not (20 // 4) = 5."""
  import types

  import jax

  from configs import quick
  from saltjax import parallel
  from saltjax.training import feeders
  from saltjax.training.job import local_batch_size, steps_per_epoch_for

  config = quick.get_config()
  config.num_folds = 2
  config.batch_size = config.eval_batch_size = 4
  fold_of = np.repeat([0, 1], 10)
  data = types.SimpleNamespace(
      train_images=np.arange(20, dtype=np.uint8)[:, None, None].repeat(101, 1).repeat(101, 2),
      train_masks=np.zeros((20, 101, 101), np.uint8),
  )
  pseudo_images = np.zeros((10, 101, 101), np.uint8)
  extra = {k: (pseudo_images, pseudo_images) for k in (0, 1)}
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  mesh = parallel.create_mesh(jax.devices()[:1])
  steps = steps_per_epoch_for(config, mesh, fold_of, num_extra={0: 10, 1: 10})
  assert steps == 4
  for host in range(4):
    monkeypatch.setattr(jax, "process_index", lambda host=host: host)
    for fold in (0, 1):
      images, masks = feeders._training_examples(config, data, fold, fold_of, extra)
      assert len(images) == len(masks) >= steps * local_batch_size(config), (host, fold)

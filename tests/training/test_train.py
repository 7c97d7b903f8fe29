"""Training: the real fold loop at tiny size lowers the loss, and every recipe
option runs through it together (folds, prediction, a pseudo-label round)."""

import json

from saltjax.app import job as job_lib
from tests.conftest import tiny_config


def test_training_lowers_the_loss(tmp_path, data_cache, compile_cache):
  from saltjax.app import process

  config = tiny_config(
      data_cache, compile_cache, fold=0, num_epochs=8, **{"schedule.name": "constant"}
  )
  process.enable_compilation_cache(config)
  job_lib.train_and_evaluate(config, str(tmp_path))
  history = json.loads((tmp_path / "fold_0" / "done.json").read_text())["history"]
  losses = [h["train_loss"] for h in history]
  assert len(losses) == 8
  assert losses[-1] < 0.85 * losses[0], losses
  # a fold-only run leaves its checkpoints and the fold assignment behind
  assert (tmp_path / "folds.csv").exists()
  assert any((tmp_path / "fold_0" / "best").iterdir())
  assert not (tmp_path / "submission.csv").exists()


def test_every_recipe_option_together(tmp_path, data_cache, compile_cache):
  """Deep supervision, the empty-mask head, hypercolumn, Lovász second stage,
  SWA, plateau schedule, SGD, heavier augmentation, TTA and a pseudo-label round."""
  from saltjax.app import process

  config = tiny_config(
      data_cache,
      compile_cache,
      num_epochs=3,
      augment="hflip|shift(4)|scale(0.1)|brightness(0.1)|contrast(0.1)",
      swa_from_epoch=1,
      **{
          "pseudo_label.enabled": True,
          "pseudo_label.max_uncertain_fraction": 1.0,
          "model.deep_supervision": True,
          "model.classifier": True,
          "model.hypercolumn": True,
          "model.upsample": "bilinear",
          "loss.second_from_epoch": 2,
          "loss.second_name": "lovasz_symmetric_elu",
          "schedule.name": "plateau",
          "schedule.plateau_patience": 1,
          "optimizer.name": "sgd",
          "optimizer.learning_rate": 0.01,
          "predict.tta": "hflip+vflip",
          "predict.checkpoints": "best+swa",
          "model.encoder_width": 4,
          "model.decoder_channels": (8, 8, 8, 8, 8),
          "num_folds": 2,
      },
  )
  process.enable_compilation_cache(config)
  scores = job_lib.train_and_evaluate(config, str(tmp_path))
  history = json.loads((tmp_path / "fold_0" / "done.json").read_text())["history"]
  assert [h["loss_name"] for h in history] == [
      "bce_dice",
      "lovasz_symmetric_elu",
      "lovasz_symmetric_elu",
  ]
  assert scores["classifier_gate"] and 0 <= scores["gate"] <= 1
  # The submission's models are the pseudo-label round's.
  history = json.loads((tmp_path / "pseudo_round" / "fold_0" / "done.json").read_text())["history"]
  assert scores["folds"]["0"]["models"] == [
      "best/" + str(history.index(max(history, key=lambda h: h["val_score"])) + 1),
      "swa/4",
  ]
  # the pseudo-label round trained on every test image and made the submission
  assert scores["pseudo_label"]["num_images"] == {"0": 12, "1": 12}
  assert (tmp_path / "pseudo_round" / "fold_1" / "done.json").exists()
  assert (tmp_path / "round1_submission.csv").exists()
  assert (tmp_path / "submission.csv").read_text() == (
      tmp_path / "pseudo_round" / "submission.csv"
  ).read_text()

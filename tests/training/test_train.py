"""Training: the real fold loop at tiny size lowers the loss, and every recipe
option runs through it together (folds, prediction, a pseudo-label round)."""

import json

from saltjax.app import job as job_lib
from saltjax.app import run as run_lib
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
          # In turn: folds trained together are tested elsewhere, and a vmap
          # over two folds doubles this model's compile on a CPU.
          "parallel_folds": 1,
      },
  )
  # As a user runs it (main.py), so that the workdir is a complete one for predict.
  assert run_lib.main(config, str(tmp_path)) == 0
  scores = json.loads((tmp_path / "scores.json").read_text())
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

  # configs/predict.py on that workdir (here to change the TTA) predicts with the
  # models its results came from, the round's, and publishes the results in the
  # workdir as the round did; the first round's files stay as they were.
  round1 = {p.name: p.read_text() for p in tmp_path.glob("round1_*")}
  rc = run_lib.main(_config("predict", tta="none"), str(tmp_path), "configs/predict.py")
  assert rc == 0
  published = json.loads((tmp_path / "scores.json").read_text())
  assert published["tta"] == "none"
  assert json.loads((tmp_path / "pseudo_round" / "scores.json").read_text())["tta"] == "none"
  assert published["pseudo_label"] == scores["pseudo_label"]
  assert (tmp_path / "submission.csv").read_text() == (
      tmp_path / "pseudo_round" / "submission.csv"
  ).read_text()
  assert {p.name: p.read_text() for p in tmp_path.glob("round1_*")} == round1
  # Sections are segmented by the same models, with that scores.json's threshold.
  from saltjax.inference import trained_config
  from saltjax.sections import predictor

  trained = trained_config.config_for_prediction(_config("segment", tta="none"), tmp_path)
  ensemble = predictor.load_ensemble(trained, tmp_path)
  assert ensemble.models and all(m.startswith("pseudo_round/fold_") for m in ensemble.models)
  assert ensemble.threshold == published["threshold"]


def _config(name: str, **predict):
  """configs/<name>.py as a user runs it, with `predict` overrides."""
  import importlib

  config = importlib.import_module(f"configs.{name}").get_config()
  config.progress = False
  config.predict.update(predict)
  return config

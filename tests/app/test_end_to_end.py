"""The user's commands, run for real at tiny size: train, predict, submit
(without TensorFlow too: test_benchmarks runs the GPU proof's whole job so)."""

import json
import shutil

import numpy as np
import pandas as pd

from saltjax.data import layout
from saltjax.data import rle
from saltjax.inference import submission
from tests.conftest import run_main, tiny_config


def test_main_train_then_predict_writes_a_valid_submission(
    trained_job, tmp_path, data_cache, compile_cache
):
  """conftest's trained_job is `main.py --config=configs/quick.py` (every fold)."""
  workdir = trained_job
  from saltjax.data import dataset as data_lib

  config = tiny_config(data_cache, compile_cache)
  data = layout.read_layout(data_lib.resolve_data_dir(config))

  # submission.csv: header, every test id once, valid 101x101 RLE
  sub = pd.read_csv(workdir / "submission.csv", dtype=str, keep_default_na=False)
  assert list(sub.columns) == ["id", "rle_mask"]
  assert sorted(sub["id"]) == sorted(data.test_ids) and len(sub) == len(data.test_ids)
  submission.check_submission(sub, data.test_ids)

  # oof.csv: every training id, masks scored as scores.json says
  oof = pd.read_csv(workdir / "oof.csv", dtype=str, keep_default_na=False)
  assert sorted(oof["id"]) == sorted(data.train_ids)
  scores = json.loads((workdir / "scores.json").read_text())
  for key in ("oof_score", "threshold", "min_area", "folds", "score_by_coverage_class"):
    assert key in scores
  assert set(scores["folds"]) == {"0", "1"}
  from saltjax import metrics

  truth = data.train_masks[[data.train_ids.index(i) for i in oof["id"]]]
  pred = np.stack([rle.decode(r) for r in oof["rle_mask"]])
  assert abs(metrics.competition_score(truth, pred) - scores["oof_score"]) < 1e-9

  # the run records what it did
  for name in (
      "config.json",
      "versions.json",
      "folds.csv",
      "training_curves.png",
      "validation_examples.png",
      "threshold_sweep.png",
  ):
    assert (workdir / name).exists(), name
  folds = pd.read_csv(workdir / "folds.csv", dtype={"id": str})
  assert sorted(folds["id"]) == sorted(data.train_ids)

  # predicting again from the workdir's checkpoints gives the same submission
  before = (workdir / "submission.csv").read_text()
  workdir = shutil.copytree(workdir, tmp_path / "run")
  (workdir / "submission.csv").unlink()
  result = run_main(
      ["--config=configs/predict.py", f"--workdir={workdir}", "--config.progress=False"]
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert (workdir / "submission.csv").read_text() == before


def test_tensorboard_holds_every_epochs_record(trained_job):
  """The metrics TensorBoard shows, read back by TensorBoard's own event reader:
  each fold's epoch records (the values of done.json's history), one a step
  that ended an epoch, and the train loss logged every few steps."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util

  logs = event_accumulator.EventAccumulator(
      str(trained_job / "tensorboard"), size_guidance={event_accumulator.TENSORS: 0}
  )
  logs.Reload()
  tags = set(logs.Tags()["tensors"])
  config = json.loads((trained_job / "config.json").read_text())
  for fold in (0, 1):
    history = json.loads((trained_job / f"fold_{fold}" / "done.json").read_text())["history"]
    assert len(history) == config["num_epochs"]
    for key in ("val_score", "val_iou", "learning_rate"):
      events = logs.Tensors(f"fold_{fold}/{key}")
      written = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events]
      np.testing.assert_allclose(written, [h[key] for h in history], rtol=1e-6, err_msg=key)
    steps = [e.step for e in logs.Tensors(f"fold_{fold}/val_score")]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) and steps[0] > 0
    assert f"fold_{fold}/train_loss" in tags

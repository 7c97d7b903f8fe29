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

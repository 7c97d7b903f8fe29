"""The user's commands, run for real at tiny size: train, predict, submit."""

import json

import numpy as np
import pandas as pd

from saltjax import layout, rle, submission
from tests.conftest import flag_args, run_main, tiny_config


def test_main_train_then_predict_writes_a_valid_submission(tmp_path, data_cache, compile_cache):
  workdir = tmp_path / "run"
  common = [
      f"--workdir={workdir}",
      f"--config.cache_dir={data_cache}",
      f"--config.compilation_cache={compile_cache}",
  ]
  result = run_main(["--config=configs/quick.py", *common, *flag_args()])
  assert result.returncode == 0, result.stderr[-3000:]

  from saltjax import data as data_lib

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
  (workdir / "submission.csv").unlink()
  result = run_main(
      ["--config=configs/predict.py", f"--workdir={workdir}", "--config.progress=False"]
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert (workdir / "submission.csv").read_text() == before


# main.py with TensorFlow (and so tensorflow-datasets and clu's writers) made
# impossible to import, as on a GPU image that lacks it.
_WITHOUT_TENSORFLOW = """
import runpy, sys
for name in ("tensorflow", "tensorflow_datasets"):
  sys.modules[name] = None
sys.argv[0] = "main.py"
runpy.run_path("main.py", run_name="__main__")
"""


def test_the_whole_job_runs_without_tensorflow(tmp_path, data_cache, compile_cache):
  """use_tfds=False and the on-device input pipeline: train, predict, submit
  with no TensorFlow at all (how the full job runs on a GPU machine without it)."""
  import subprocess
  import sys

  from tests.conftest import REPO

  workdir = tmp_path / "run"
  args = [
      "--config=configs/quick.py",
      f"--workdir={workdir}",
      f"--config.cache_dir={data_cache}",
      f"--config.compilation_cache={compile_cache}",
      "--config.use_tfds=False",
      "--config.input_pipeline=device",
      *flag_args(num_epochs=2),
  ]
  result = subprocess.run(
      [sys.executable, "-c", _WITHOUT_TENSORFLOW, *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=900,
      env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "TensorFlow is not installed" in result.stderr
  sub = pd.read_csv(workdir / "submission.csv", dtype=str, keep_default_na=False)
  assert len(sub) == 12  # conftest's synthetic test images
  history = json.loads((workdir / "fold_0" / "done.json").read_text())["history"]
  assert len(history) == 2

"""Prediction from a trained workdir: which checkpoints, which folds, which test images.

The suite's tiny two-fold job (conftest's trained_job: three epochs, no SWA,
trained once by main.py) is what each test predicts from, from a copy of it,
in-process, as main.py does.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO

EPOCHS = 3


@pytest.fixture(scope="module")
def trained(trained_job):
  return trained_job


def _copy(trained: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  shutil.copytree(trained, tmp_path / "run")
  return tmp_path / "run"


def _predict(workdir, capfd, monkeypatch, **overrides) -> tuple[int, str]:
  """run.main in predict mode, as `main.py --config=configs/predict.py` runs it."""
  from configs import predict as predict_config
  from saltjax.app import run

  monkeypatch.delenv("SALTJAX_DEBUG", raising=False)
  config = predict_config.get_config()
  config.progress = False
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  capfd.readouterr()
  rc = run.main(config, str(workdir), str(REPO / "configs" / "predict.py"))
  return rc, capfd.readouterr().err


def _empty_checkpoints(fold_dir: pathlib.Path) -> None:
  """What a run killed before a fold's first save leaves: empty store directories."""
  for store in ("latest", "best", "snapshots", "swa"):
    shutil.rmtree(fold_dir / store, ignore_errors=True)
    (fold_dir / store).mkdir()


@pytest.mark.parametrize(
    "which, expected",
    [
        ("latest", ["latest/3"]),
        ("best+latest", None),  # best/<its epoch>, then latest/3
    ],
)
def test_latest_checkpoint_predicts(which, expected, trained, tmp_path, capfd, monkeypatch, caplog):
  workdir = _copy(trained, tmp_path)
  rc, err = _predict(workdir, capfd, monkeypatch, **{"predict.checkpoints": which})
  assert rc == 0, err
  scores = json.loads((workdir / "scores.json").read_text())
  done = json.loads((workdir / "fold_0" / "done.json").read_text())
  models = scores["folds"]["0"]["models"]
  assert models == (expected or [f"best/{done['best_epoch']}", "latest/3"])
  assert scores["checkpoints"] == which


def test_latest_predicts_what_the_final_weights_predict(trained, tmp_path, capfd, monkeypatch):
  """`latest` holds the whole train state; its model variables are the final weights."""
  import jax
  from saltjax import checkpoints as ckpt_lib
  from saltjax.inference import trained_config
  from saltjax.model import unet
  from configs import predict as predict_config

  config = trained_config.config_for_prediction(predict_config.get_config(), trained)
  model = unet.create_model(config.model)
  abstract = jax.eval_shape(lambda: unet.initialized(jax.random.key(0), model, config.image_size))
  variables = ckpt_lib.restore_variables(
      trained / "fold_0", "latest", EPOCHS, abstract, ckpt_lib.fingerprint(config)
  )
  store = ckpt_lib.Store(trained / "fold_0" / "latest", max_to_keep=None)
  raw, _ = store.restore_raw(EPOCHS, ckpt_lib.fingerprint(config))
  store.close()
  for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(raw["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_structure_mismatch_says_so_instead_of_corrupt(trained):
  import jax
  from saltjax import checkpoints as ckpt_lib
  from saltjax.inference import trained_config
  from saltjax.model import unet
  from configs import predict as predict_config

  config = trained_config.config_for_prediction(predict_config.get_config(), trained)
  model = unet.create_model(config.model)
  abstract = jax.eval_shape(lambda: unet.initialized(jax.random.key(0), model, config.image_size))
  # A program whose model has one more parameter than the checkpoint.
  abstract["params"]["extra_head"] = {"kernel": jax.ShapeDtypeStruct((3, 3), np.float32)}
  for store, step in (
      ("best", ckpt_lib.model_checkpoints(trained / "fold_0", "best")[0][1]),
      ("latest", EPOCHS),
  ):
    with pytest.raises(ckpt_lib.CheckpointError) as raised:
      ckpt_lib.restore_variables(
          trained / "fold_0", store, step, abstract, ckpt_lib.fingerprint(config)
      )
    message = str(raised.value)
    assert "different structure" in message and "extra_head" in message, message
    assert "corrupt" not in message


def test_a_fold_without_checkpoints_is_left_out_and_named(
    trained, tmp_path, capfd, monkeypatch, caplog
):
  workdir = _copy(trained, tmp_path)
  _empty_checkpoints(workdir / "fold_1")
  (workdir / "fold_1" / "done.json").unlink()
  caplog.set_level("WARNING")
  rc, err = _predict(workdir, capfd, monkeypatch)
  assert rc == 0, err
  scores = json.loads((workdir / "scores.json").read_text())
  assert sorted(scores["folds"]) == ["0"]
  assert "snapshots" in scores["folds_left_out"]["1"]
  assert "fold 1 left out of the ensemble" in caplog.text
  # Only fold 0's held-out ids are scored out-of-fold.
  folds = pd.read_csv(workdir / "folds.csv", dtype={"id": str})
  oof = pd.read_csv(workdir / "oof.csv", dtype={"id": str})
  assert sorted(oof["id"]) == sorted(folds["id"][folds["fold"] == 0])


@pytest.mark.parametrize("case", ["no_fold_has_checkpoints", "swa_never_trained"])
def test_no_usable_checkpoint_refuses_and_keeps_previous_outputs(
    case, trained, tmp_path, capfd, monkeypatch
):
  workdir = _copy(trained, tmp_path)
  overrides = {}
  if case == "no_fold_has_checkpoints":
    for fold in (0, 1):
      _empty_checkpoints(workdir / f"fold_{fold}")
  else:
    overrides["predict.checkpoints"] = "swa"
  before = {
      name: (workdir / name).read_bytes() for name in ("submission.csv", "oof.csv", "scores.json")
  }
  rc, err = _predict(workdir, capfd, monkeypatch, **overrides)
  assert rc == 1
  assert f"error: no fold in {workdir} can predict" in err
  assert "fold 0" in err and "fold 1" in err and "nothing was written" in err
  assert "Traceback" not in err
  for name, content in before.items():
    assert (workdir / name).read_bytes() == content, name


def test_data_dir_predicts_another_directorys_test_images(trained, tmp_path, capfd, monkeypatch):
  from saltjax.inference import submission
  from saltjax.data import synthetic_dataset

  other = synthetic_dataset.write_dataset(tmp_path / "other", num_train=4, num_test=5, seed=7)
  shutil.rmtree(other / "train")  # test images alone are enough
  (other / "train.csv").unlink()
  workdir = _copy(trained, tmp_path)
  oof_before = (workdir / "oof.csv").read_text()
  rc, err = _predict(workdir, capfd, monkeypatch, data_dir=str(other))
  assert rc == 0, err
  sub = pd.read_csv(workdir / "submission.csv", dtype=str, keep_default_na=False)
  test_ids = sorted(p.stem for p in (other / "test" / "images").iterdir())
  assert sorted(sub["id"]) == test_ids
  submission.check_submission(sub, test_ids)
  scores = json.loads((workdir / "scores.json").read_text())
  assert scores["test_data_dir"] == str(other) and scores["num_test"] == 5
  # The out-of-fold part still comes from the training data.
  assert (workdir / "oof.csv").read_text() == oof_before


def test_other_overrides_are_named_not_silently_ignored(
    trained, tmp_path, capfd, monkeypatch, caplog
):
  workdir = _copy(trained, tmp_path)
  caplog.set_level("WARNING")
  rc, err = _predict(workdir, capfd, monkeypatch, **{"model.encoder_width": 16})
  assert rc == 0, err
  assert "config.model.encoder_width=16 is ignored" in caplog.text


def _steps(store_dir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in store_dir.iterdir() if p.name.isdigit())


def test_best_is_the_recorded_model_and_an_unfinished_fold_is_named(
    trained, tmp_path, capfd, monkeypatch, caplog
):
  """A leftover best/99 (what an abandoned run can leave above the steps a resumed run
  writes) is not taken for the best model: fold 0's is the step its done.json names,
  and fold 1, whose training never finished, takes its resume point's best_epoch and
  is named in a warning with the epoch it stopped at."""
  workdir = _copy(trained, tmp_path)
  recorded = {}
  for fold in (0, 1):
    fold_dir = workdir / f"fold_{fold}"
    recorded[fold] = json.loads((fold_dir / "done.json").read_text())["best_epoch"]
    snapshot = _steps(fold_dir / "snapshots")[0]
    shutil.copytree(fold_dir / "snapshots" / str(snapshot), fold_dir / "best" / "99")
  (workdir / "fold_1" / "done.json").unlink()
  caplog.set_level("WARNING")
  rc, err = _predict(workdir, capfd, monkeypatch, **{"predict.checkpoints": "best"})
  assert rc == 0, err
  scores = json.loads((workdir / "scores.json").read_text())
  assert scores["folds"]["0"]["models"] == [f"best/{recorded[0]}"]
  assert scores["folds"]["1"]["models"] == [f"best/{recorded[1]}"]
  assert (
      f"fold 1 never finished training (no done.json): its last resume point is epoch {EPOCHS}"
      in (caplog.text)
  )
  assert "fold 0 never finished" not in caplog.text
  assert scores["folds"]["1"]["finished"] is False
  assert scores["folds"]["1"]["last_epoch"] == EPOCHS
  assert "finished" not in scores["folds"]["0"]

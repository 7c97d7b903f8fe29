"""Prediction: fold + snapshot ensemble with TTA, tuned post-processing, submission.

For every trained fold, each selected checkpoint (snapshots by default)
predicts its fold's held-out ids (out-of-fold) and the test set with TTA;
probabilities are averaged over TTA views, then over the fold's checkpoints,
then (test only) over folds. The binarisation threshold, the minimum mask
area and the empty-mask gate are tuned on the out-of-fold predictions by
maximising the competition metric; every choice is recorded in scores.json.

`predict_and_submit` runs the steps: `collect_probabilities` (the ensemble,
from `saltjax.inference.ensemble`), `score_out_of_fold` (the tuning, from
`saltjax.inference.postprocess`), `write_outputs`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import jax
import numpy as np
import pandas as pd

from saltjax.data import dataset as data_lib
from saltjax import geometry
from saltjax.inference import ensemble
from saltjax.inference import postprocess
from saltjax.model import tta
from saltjax import metrics
from saltjax.model import unet
from saltjax import parallel
from saltjax import prediction_plots
from saltjax.data import rle
from saltjax.inference import submission as submission_lib
from saltjax import workdir as workdir_lib
from saltjax.errors import CheckpointError


@dataclasses.dataclass
class Prediction:
  """What `predict_and_submit` computed: the scores, and the test probabilities.

  `fold_test_probs` holds each fold's own ensemble on the test set (the
  pseudo-label round takes fold k's labels from fold k's models alone).
  """

  scores: dict
  test_probs: np.ndarray
  fold_test_probs: dict[int, np.ndarray]


@dataclasses.dataclass
class Probabilities:
  """What the folds' models predicted (`collect_probabilities`).

  Out-of-fold: every training id of a predicted fold, by that fold's
  checkpoints (zero for the ids of folds left out); test: by each fold.
  """

  oof: np.ndarray  # (train ids, 101, 101)
  oof_class: np.ndarray  # (train ids,): the classifier's salt probability
  fold_test: dict[int, np.ndarray]  # fold -> (test ids, 101, 101)
  test_class: np.ndarray  # (test ids,): averaged over every fold's checkpoints
  fold_scores: dict[int, float]  # fold -> its OOF score at threshold 0.5
  models_used: dict[int, list[str]]  # fold -> its checkpoints, "store/step"


def predict_and_submit(config, workdir, data=None, mesh=None) -> Prediction:
  """Ensembles the workdir's folds; writes submission.csv, oof.csv, scores.json.

  Only folds that hold the checkpoints `config.predict.checkpoints` asks for
  take part; the others are named in the log and in scores.json. With none,
  nothing is written (a submission of empty masks would look like success).
  """
  workdir = pathlib.Path(workdir)
  mesh = mesh or parallel.create_mesh()
  usable, left_out = ensemble.usable_folds(workdir, config.num_folds, config.predict.checkpoints)
  if not usable:
    why = "; ".join(f"fold {k} {reason}" for k, reason in left_out.items())
    raise CheckpointError(
        f"no fold in {workdir} can predict: {why}. Train first (python main.py"
        " --config=configs/fold.py --workdir=...) or choose other checkpoints with"
        " --config.predict.checkpoints=best|latest|snapshots|swa; nothing was written"
    )
  ensemble.warn_left_out(left_out)
  data = data if data is not None else data_lib.load(config)
  fold_of = data_lib.folds_for_run(config, data, workdir)
  test_data = data
  if config.get("predict_data_dir", ""):
    test_data = data_lib.load_test(config, config.predict_data_dir)
  probs = collect_probabilities(config, workdir, usable, data, test_data, fold_of, mesh)
  test = sum(probs.fold_test.values()) / len(usable)
  predicted = np.isin(fold_of, sorted(usable))
  scores, oof_masks = score_out_of_fold(
      config, workdir, data.train_masks[predicted], probs, predicted, left_out, test_data
  )
  if jax.process_index() == 0:
    test_class = probs.test_class if config.model.classifier else None
    test_masks = postprocess.apply_postprocessing(
        test, scores["threshold"], scores["min_area"], test_class, scores["gate"]
    )
    write_outputs(
        workdir, data, predicted, probs.oof[predicted], oof_masks, test_data, test_masks, scores
    )
  return Prediction(scores=scores, test_probs=test, fold_test_probs=probs.fold_test)


def predict_workdir(config, workdir, data=None, mesh=None) -> Prediction:
  """What configs/predict.py runs: the ensemble of the models the workdir's results came from.

  After a pseudo-label round those are the round's (`ensemble.models_dir`):
  it predicts again there and publishes the results in the workdir, as the
  round itself did, keeping scores.json's account of how the labels were made.
  """
  workdir = pathlib.Path(workdir)
  source = ensemble.models_dir(workdir)
  if source == workdir:
    return predict_and_submit(config, workdir, data, mesh)
  logging.info(
      "%s holds a pseudo-label round's results: predicting with that round's models (%s)",
      workdir,
      source,
  )
  pseudo_label = json.loads((workdir / workdir_lib.SCORES_JSON).read_text())["pseudo_label"]
  prediction = predict_and_submit(config, source, data, mesh)
  scores = {**prediction.scores, "pseudo_label": pseudo_label}
  publish_round(workdir, source, scores)
  return dataclasses.replace(prediction, scores=scores)


def publish_round(workdir: pathlib.Path, round_dir: pathlib.Path, scores: dict) -> None:
  """A pseudo-label round's submission, oof and scores as the workdir's own (process 0)."""
  if jax.process_index() != 0:
    return
  for name in (workdir_lib.SUBMISSION_CSV, workdir_lib.OOF_CSV):
    workdir_lib.write_text((round_dir / name).read_text(), workdir / name)
  workdir_lib.write_json(scores, workdir / workdir_lib.SCORES_JSON)


def collect_probabilities(
    config, workdir: pathlib.Path, usable: dict[int, list], data, test_data, fold_of, mesh
) -> Probabilities:
  """Every usable fold's checkpoints on its held-out training ids and on the test images.

  usable: {fold: [(store, step)]} (`ensemble.usable_folds`); fold_of: each
  training id's fold. A fold's probabilities are the mean over its checkpoints.
  """
  folds = sorted(usable)
  model = unet.create_model(config.model)
  forward = ensemble.jitted_forward(config, model, mesh, tta.progress_enabled(config))
  size = geometry.ORIGINAL_SIZE
  n_train, n_test = len(data.train_ids), len(test_data.test_ids)
  out = Probabilities(
      oof=np.zeros((n_train, size, size), np.float32),
      oof_class=np.zeros(n_train, np.float32),
      fold_test={k: np.zeros((n_test, size, size), np.float32) for k in folds},
      test_class=np.zeros(n_test, np.float32),
      fold_scores={},
      models_used={},
  )
  for fold in folds:
    fold_dir = workdir_lib.fold_dir(workdir, fold)
    chosen = usable[fold]
    val_idx = np.flatnonzero(fold_of == fold)
    out.models_used[fold] = [f"{store}/{step}" for store, step in chosen]
    for store, step in chosen:
      variables = forward.place(ensemble.load_variables(config, model, fold_dir, store, step))
      val = forward(variables, data.train_images[val_idx], f"fold {fold} {store}/{step} oof")
      out.oof[val_idx] += val["probs"] / len(chosen)
      if "class_probs" in val:
        out.oof_class[val_idx] += val["class_probs"] / len(chosen)
      if n_test:
        test = forward(variables, test_data.test_images, f"fold {fold} {store}/{step} test")
        out.fold_test[fold] += test["probs"] / len(chosen)
        if "class_probs" in test:
          out.test_class += test["class_probs"] / (len(chosen) * len(folds))
    out.fold_scores[fold] = metrics.competition_score(
        data.train_masks[val_idx], out.oof[val_idx] > 0.5
    )
    logging.info(
        "fold %d: %d model(s), OOF score at 0.5 with TTA %.4f",
        fold,
        len(chosen),
        out.fold_scores[fold],
    )
  return out


def score_out_of_fold(
    config, workdir: pathlib.Path, truth, probs: Probabilities, predicted, left_out, test_data
) -> tuple[dict, np.ndarray]:
  """(scores.json's record, the out-of-fold masks): the post-processing tuned on the
  out-of-fold probabilities of the predicted ids (`predicted`; their masks `truth`)."""
  has_class = bool(config.model.classifier)
  oof = probs.oof[predicted]
  oof_class = probs.oof_class[predicted] if has_class else None
  choice = postprocess.tune(truth, oof, oof_class, config)
  oof_masks = postprocess.apply_postprocessing(
      oof, choice["threshold"], choice["min_area"], oof_class, choice["gate"]
  )
  folds = sorted(probs.fold_scores)
  scores = {
      "oof_score": metrics.competition_score(truth, oof_masks),
      "oof_iou": float(metrics.iou_per_image(truth, oof_masks).mean()),
      **{k: v for k, v in choice.items() if k != "threshold_sweep"},
      "threshold_sweep": [{"threshold": t, "score": s} for t, s in choice["threshold_sweep"]],
      "folds": {
          str(k): _fold_record(workdir, k, probs.fold_scores[k], probs.models_used[k])
          for k in folds
      },
      "folds_left_out": {str(k): reason for k, reason in left_out.items()},
      "score_by_coverage_class": {
          str(c): v for c, v in metrics.score_by_coverage_class(truth, oof_masks).items()
      },
      "num_oof": int(predicted.sum()),
      "num_test": len(test_data.test_ids),
      "test_data_dir": config.get("predict_data_dir", ""),
      "tta": config.predict.tta,
      "checkpoints": config.predict.checkpoints,
      "classifier_gate": has_class and bool(config.predict.classifier_gate),
      "resize_mode": config.resize_mode,
      "image_size": config.image_size,
  }
  logging.info(
      "OOF score %.4f (IoU %.4f) at threshold %.2f, min area %d over %d ids",
      scores["oof_score"],
      scores["oof_iou"],
      scores["threshold"],
      scores["min_area"],
      scores["num_oof"],
  )

  for cls, record in scores["score_by_coverage_class"].items():
    logging.info(
        "  coverage class %2s: %4d images, OOF score %.4f", cls, record["count"], record["score"]
    )
  return scores, oof_masks


def write_outputs(
    workdir, data, predicted, oof_probs, oof_masks, test_data, test_masks, scores: dict
) -> None:
  """oof.csv (the masks of the predicted training ids), submission.csv, scores.json
  and the prediction plots."""
  oof_ids = [i for i, keep in zip(data.train_ids, predicted) if keep]
  workdir_lib.write_csv(
      pd.DataFrame({"id": oof_ids, "rle_mask": [rle.encode(m) for m in oof_masks]}),
      workdir / workdir_lib.OOF_CSV,
  )
  submission_lib.write_submission(
      workdir / workdir_lib.SUBMISSION_CSV, test_data.test_ids, test_masks
  )
  workdir_lib.write_json(scores, workdir / workdir_lib.SCORES_JSON)
  prediction_plots.write_prediction_plots(workdir, data, oof_ids, oof_probs, oof_masks, scores)


def _fold_record(workdir, fold, oof_score, models_used) -> dict:
  record = {"oof_score_at_0.5": oof_score, "models": models_used}
  summary = workdir_lib.read_done(workdir, fold)
  if summary is not None:
    record.update(val_score=summary["val_score"], best_epoch=summary["best_epoch"])
  else:
    record.update(finished=False, last_epoch=ensemble.last_epoch(workdir, fold))
  return record

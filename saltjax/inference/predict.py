"""Prediction: fold + snapshot ensemble with TTA, tuned post-processing, submission.

For every trained fold, each selected checkpoint (snapshots by default)
predicts its fold's held-out ids (out-of-fold) and the test set with TTA;
probabilities are averaged over TTA views, then over the fold's checkpoints,
then (test only) over folds. The binarisation threshold, the minimum mask
area and the empty-mask gate are tuned on the out-of-fold predictions by
maximising the competition metric; every choice is recorded in scores.json.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib

import jax
import numpy as np
import pandas as pd

from saltjax import checkpoints as ckpt_lib
from saltjax.data import dataset as data_lib
from saltjax import geometry
from saltjax.model import tta
from saltjax import metrics
from saltjax.model import unet
from saltjax import parallel
from saltjax import plots
from saltjax.data import rle
from saltjax.inference import submission as submission_lib
from saltjax import workdir as workdir_lib
from saltjax.errors import CheckpointError

THRESHOLDS = np.round(np.arange(0.20, 0.805, 0.02), 2)
MIN_AREAS = (0, 5, 10, 20, 40, 80, 150, 300)
GATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@dataclasses.dataclass
class Prediction:
  """What `predict_and_submit` computed: the scores, and the test probabilities.

  `fold_test_probs` holds each fold's own ensemble on the test set (the
  pseudo-label round takes fold k's labels from fold k's models alone).
  """

  scores: dict
  test_probs: np.ndarray
  fold_test_probs: dict[int, np.ndarray]


def usable_folds(
    workdir: pathlib.Path, num_folds: int, which: str
) -> tuple[dict[int, list], dict[int, str]]:
  """({fold: [(store, step)]} of the folds holding the checkpoints `which` asks for,
  {fold: why it is left out} of the others).

  A usable fold whose training never finished (no done.json: killed, or
  still running) takes part with what its run recorded, and a warning names
  it with the last epoch its resume point holds.
  """
  usable, left_out = {}, {}
  for k in range(num_folds):
    fold_dir = workdir_lib.fold_dir(workdir, k)
    if not fold_dir.is_dir():
      left_out[k] = "not trained"
      continue
    chosen = ckpt_lib.model_checkpoints(fold_dir, which)
    if chosen:
      usable[k] = chosen
      if workdir_lib.read_done(workdir, k) is None:
        logging.warning("%s", unfinished_warning(workdir, k, chosen))
    else:
      left_out[k] = f"holds no {which!r} checkpoint (config.predict.checkpoints)"
  return usable, left_out


def last_epoch(workdir: pathlib.Path, fold: int) -> int | None:
  """The epoch of an unfinished fold's resume point (None: it has none)."""
  point = ckpt_lib.resume_point(workdir_lib.fold_dir(workdir, fold))
  return None if point is None else point[0]


def unfinished_warning(workdir: pathlib.Path, fold: int, chosen: list) -> str:
  epoch = last_epoch(workdir, fold)
  where = (
      f"its last resume point is epoch {epoch}"
      if epoch is not None
      else "it has no resume point (killed in its first epochs)"
  )
  models = ", ".join(f"{store}/{step}" for store, step in chosen)
  return (
      f"fold {fold} never finished training (no {workdir_lib.DONE_JSON}): {where};"
      f" it predicts with {models}, a model of an unfinished run. Run the training"
      " command again to finish it"
  )


def trained_folds(
    workdir: pathlib.Path, num_folds: int, which: str = "best+snapshots"
) -> list[int]:
  """The folds of `workdir` that hold a checkpoint `which` selects."""
  return sorted(usable_folds(workdir, num_folds, which)[0])


@functools.lru_cache(maxsize=8)
def abstract_variables(model, image_size: int):
  """The shapes and dtypes of `model`'s {params, batch_stats}, traced once per
  model rather than once per checkpoint restored (an ensemble of 5 folds x 3
  snapshots would otherwise trace the ResNet50 U-Net's init 15 times)."""
  return jax.eval_shape(lambda: unet.initialized(jax.random.key(0), model, image_size))


def load_variables(config, model, fold_dir: pathlib.Path, store: str, step: int):
  abstract = abstract_variables(model, config.image_size)
  return ckpt_lib.restore_variables(fold_dir, store, step, abstract, ckpt_lib.fingerprint(config))


def apply_postprocessing(
    probs: np.ndarray,
    threshold: float,
    min_area: int,
    class_probs: np.ndarray | None = None,
    gate: float = 0.0,
) -> np.ndarray:
  """Binary masks: threshold, then empty masks below min_area or the gate."""
  masks = probs > threshold
  empty = masks.reshape(len(masks), -1).sum(1) < max(min_area, 1)
  if class_probs is not None:
    empty |= class_probs < gate
  masks[empty] = False
  return masks


def tune(truth: np.ndarray, probs: np.ndarray, class_probs: np.ndarray | None, config) -> dict:
  """Threshold, then min area, then gate, each maximising the OOF metric."""
  p = config.predict
  sweep = [(float(t), metrics.competition_score(truth, probs > t)) for t in THRESHOLDS]
  threshold = p.threshold if p.threshold >= 0 else max(sweep, key=lambda s: s[1])[0]
  if p.min_area >= 0:
    min_area = int(p.min_area)
  else:
    scores = [
        (a, metrics.competition_score(truth, apply_postprocessing(probs, threshold, a)))
        for a in MIN_AREAS
    ]
    min_area = max(scores, key=lambda s: (s[1], -s[0]))[0]
  gate = 0.0
  if class_probs is not None and p.classifier_gate:
    scores = [
        (
            g,
            metrics.competition_score(
                truth, apply_postprocessing(probs, threshold, min_area, class_probs, g)
            ),
        )
        for g in GATES
    ]
    gate = max(scores, key=lambda s: (s[1], -s[0]))[0]
  return {
      "threshold": float(threshold),
      "min_area": min_area,
      "gate": float(gate),
      "threshold_sweep": sweep,
  }


def predict_and_submit(config, workdir, data=None, mesh=None) -> Prediction:
  """Ensembles the workdir's folds; writes submission.csv, oof.csv, scores.json.

  Only folds that hold the checkpoints `config.predict.checkpoints` asks for
  take part; the others are named in the log and in scores.json. With none,
  nothing is written (a submission of empty masks would look like success).
  """
  workdir = pathlib.Path(workdir)
  mesh = mesh or parallel.create_mesh()
  usable, left_out = usable_folds(workdir, config.num_folds, config.predict.checkpoints)
  if not usable:
    why = "; ".join(f"fold {k} {reason}" for k, reason in left_out.items())
    raise CheckpointError(
        f"no fold in {workdir} can predict: {why}. Train first (python main.py"
        " --config=configs/fold.py --workdir=...) or choose other checkpoints with"
        " --config.predict.checkpoints=best|latest|snapshots|swa; nothing was written"
    )
  for k, reason in left_out.items():
    logging.warning("fold %d left out of the ensemble: %s", k, reason)
  data = data if data is not None else data_lib.load(config)
  fold_of = data_lib.folds_for_run(config, data, workdir)
  test_data = data
  if config.get("predict_data_dir", ""):
    test_data = data_lib.load_test(config, config.predict_data_dir)
  folds = sorted(usable)
  parallel.check_batch_size(config.predict.batch_size, mesh, "config.predict.batch_size")
  model = unet.create_model(config.model)
  infer_fn = jax.jit(
      tta.make_infer_fn(model, config.image_size, config.resize_mode, config.predict.tta)
  )
  progress = tta.progress_enabled(config)

  def run(variables, images, what):
    return tta.predict_probs(
        infer_fn,
        variables,
        images,
        batch_size=config.predict.batch_size,
        mesh=mesh,
        progress=what if progress else None,
    )

  size = geometry.ORIGINAL_SIZE
  n_train, n_test = len(data.train_ids), len(test_data.test_ids)
  oof = np.zeros((n_train, size, size), np.float32)
  oof_class = np.zeros(n_train, np.float32)
  fold_test = {k: np.zeros((n_test, size, size), np.float32) for k in folds}
  test_class = np.zeros(n_test, np.float32)
  fold_scores, models_used = {}, {}
  for fold in folds:
    fold_dir = workdir_lib.fold_dir(workdir, fold)
    chosen = usable[fold]
    val_idx = np.flatnonzero(fold_of == fold)
    models_used[fold] = [f"{store}/{step}" for store, step in chosen]
    for store, step in chosen:
      variables = jax.device_put(
          load_variables(config, model, fold_dir, store, step), parallel.replicated(mesh)
      )
      val = run(variables, data.train_images[val_idx], f"fold {fold} {store}/{step} oof")
      oof[val_idx] += val["probs"] / len(chosen)
      if "class_probs" in val:
        oof_class[val_idx] += val["class_probs"] / len(chosen)
      if n_test:
        out = run(variables, test_data.test_images, f"fold {fold} {store}/{step} test")
        fold_test[fold] += out["probs"] / len(chosen)
        if "class_probs" in out:
          test_class += out["class_probs"] / (len(chosen) * len(folds))
    fold_scores[fold] = metrics.competition_score(data.train_masks[val_idx], oof[val_idx] > 0.5)
    logging.info(
        "fold %d: %d model(s), OOF score at 0.5 with TTA %.4f", fold, len(chosen), fold_scores[fold]
    )
  test = sum(fold_test.values()) / len(folds)

  has_class = bool(config.model.classifier)
  predicted = np.isin(fold_of, folds)
  truth = data.train_masks[predicted]
  choice = tune(truth, oof[predicted], oof_class[predicted] if has_class else None, config)
  post = dict(threshold=choice["threshold"], min_area=choice["min_area"], gate=choice["gate"])
  oof_masks = apply_postprocessing(
      oof[predicted],
      post["threshold"],
      post["min_area"],
      oof_class[predicted] if has_class else None,
      post["gate"],
  )
  oof_ids = [i for i, keep in zip(data.train_ids, predicted) if keep]
  scores = {
      "oof_score": metrics.competition_score(truth, oof_masks),
      "oof_iou": float(metrics.iou_per_image(truth, oof_masks).mean()),
      **{k: v for k, v in choice.items() if k != "threshold_sweep"},
      "threshold_sweep": [{"threshold": t, "score": s} for t, s in choice["threshold_sweep"]],
      "folds": {str(k): _fold_record(workdir, k, fold_scores[k], models_used[k]) for k in folds},
      "folds_left_out": {str(k): reason for k, reason in left_out.items()},
      "score_by_coverage_class": {
          str(c): v for c, v in metrics.score_by_coverage_class(truth, oof_masks).items()
      },
      "num_oof": int(predicted.sum()),
      "num_test": n_test,
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
      post["threshold"],
      post["min_area"],
      scores["num_oof"],
  )

  for cls, record in scores["score_by_coverage_class"].items():
    logging.info(
        "  coverage class %2s: %4d images, OOF score %.4f", cls, record["count"], record["score"]
    )
  if jax.process_index() == 0:
    workdir_lib.write_csv(
        pd.DataFrame({"id": oof_ids, "rle_mask": [rle.encode(m) for m in oof_masks]}),
        workdir / workdir_lib.OOF_CSV,
    )
    test_masks = apply_postprocessing(
        test, post["threshold"], post["min_area"], test_class if has_class else None, post["gate"]
    )
    submission_lib.write_submission(
        workdir / workdir_lib.SUBMISSION_CSV, test_data.test_ids, test_masks
    )
    workdir_lib.write_json(scores, workdir / workdir_lib.SCORES_JSON)
    plots.write_prediction_plots(workdir, data, oof_ids, oof[predicted], oof_masks, scores)
  return Prediction(scores=scores, test_probs=test, fold_test_probs=fold_test)


def _fold_record(workdir, fold, oof_score, models_used) -> dict:
  record = {"oof_score_at_0.5": oof_score, "models": models_used}
  summary = workdir_lib.read_done(workdir, fold)
  if summary is not None:
    record.update(val_score=summary["val_score"], best_epoch=summary["best_epoch"])
  else:
    record.update(finished=False, last_epoch=last_epoch(workdir, fold))
  return record

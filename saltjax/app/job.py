"""The job: train the config's folds, predict, a pseudo-label round.

`train_and_evaluate` wires the trainer and the predictor together; they know
nothing of each other. The folds train `config.parallel_folds` at a time, their
metrics go to one writer, and the training curves are drawn from the finished
folds' histories.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import ml_collections

from saltjax import errors
from saltjax import workdir as workdir_lib


def folds_to_train(config) -> list[int]:
  if config.fold == -1:
    return list(range(config.num_folds))
  if not 0 <= config.fold < config.num_folds:
    raise errors.ConfigError(
        f"config.fold={config.fold} is out of range for"
        f" config.num_folds={config.num_folds} (use -1 for all folds)"
    )
  return [config.fold]


def fold_groups(config, folds: list[int]) -> list[list[int]]:
  """The folds trained together: `config.parallel_folds` at a time (0: all)."""
  size = config.get("parallel_folds", 1) or len(folds)
  return [folds[i : i + size] for i in range(0, len(folds), size)]


def write_training_curves(config, workdir: pathlib.Path) -> None:
  """training_curves.png from the histories of the workdir's finished folds."""
  if jax.process_index() != 0:
    return
  from saltjax.training import optimizers
  from saltjax import plots

  done = {k: workdir_lib.read_done(workdir, k) for k in range(config.num_folds)}
  histories = {k: d["history"] for k, d in done.items() if d is not None}
  plots.write_training_curves(workdir, histories, optimizers.cycle_end_epochs(config))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data=None) -> dict:
  """Trains the config's folds; when they are all of them, predicts."""
  from saltjax.data import dataset as data_lib
  from saltjax import parallel
  from saltjax.inference import predict

  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = parallel.create_mesh()
  logging.info(
      "Devices: %d (%s), processes: %d", mesh.size, jax.devices()[0].platform, jax.process_count()
  )
  data = data if data is not None else data_lib.load(config)
  fold_of = data_lib.folds_for_run(config, data, workdir)
  summaries = train_folds(config, workdir, data, fold_of, mesh)
  if config.fold != -1:
    return {"folds": summaries}
  result = predict.predict_and_submit(config, workdir, data=data, mesh=mesh)
  write_training_curves(config, workdir)
  if config.pseudo_label.enabled:
    return pseudo_label_round(config, workdir, data, fold_of, mesh, result)
  return result.scores


def train_folds(config, workdir: pathlib.Path, data, fold_of, mesh, extra=None) -> list:
  """Trains the config's folds, `config.parallel_folds` at a time; finished ones are skipped."""
  from saltjax.training import loop
  from saltjax.training.job import Job

  folds = folds_to_train(config)
  todo = [k for k in folds if workdir_lib.read_done(workdir, k) is None]
  writer = _metric_writer(workdir)
  summaries = {}
  try:
    if not todo:  # nothing to compile: every fold is finished
      return [workdir_lib.read_done(workdir, k) for k in folds]
    num_extra = {k: len(v[0]) for k, v in extra.items()} if extra is not None else 0
    job = Job.create(config, mesh, fold_of, writer, num_extra=num_extra)
    for group in fold_groups(config, folds):
      summaries.update(zip(group, loop.train_folds(job, workdir, group, data, fold_of, extra)))
  finally:
    writer.close()
  write_training_curves(config, workdir)
  return [summaries[k] for k in folds]


def _tensorflow_installed() -> bool:
  """Whether TensorFlow can be imported (the GPU image we measure on has none)."""
  import importlib.util

  try:
    return importlib.util.find_spec("tensorflow") is not None
  except (ImportError, ValueError):  # blocked in sys.modules
    return False


class _LoggingWriter:
  """Metrics to the log alone: processes other than 0, and machines without TensorFlow."""

  def write_scalars(self, step: int, scalars: dict) -> None:
    logging.debug("step %d: %s", step, scalars)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class _TensorBoardWriter(_LoggingWriter):
  """Scalars to TensorBoard's event files in `logdir` (`tf.summary`), and to the log.

  TensorFlow's own summary writer, which clu's TensorBoard writer wraps; clu's
  also imports TensorBoard's hyperparameter plugin, and through it Keras
  (about 2 s of CPU at every start) for hyperparameters this job never writes.
  """

  def __init__(self, logdir: str):
    from saltjax.host_tensorflow import tf

    self._tf = tf
    self._writer = tf.summary.create_file_writer(logdir)

  def write_scalars(self, step: int, scalars: dict) -> None:
    super().write_scalars(step, scalars)
    with self._writer.as_default(step=int(step)):
      for name, value in scalars.items():
        self._tf.summary.scalar(name, float(value))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _metric_writer(workdir: pathlib.Path):
  """Process 0's TensorBoard + log writer; the log alone elsewhere, or without TensorFlow."""
  if jax.process_index() > 0:
    return _LoggingWriter()
  if not _tensorflow_installed():
    logging.info("TensorFlow is not installed: metrics go to the log, not TensorBoard.")
    return _LoggingWriter()
  return _TensorBoardWriter(str(workdir / workdir_lib.TENSORBOARD))


def pseudo_label_round(config, workdir: pathlib.Path, data, fold_of, mesh, first) -> dict:
  """A second round with confident test predictions added to each fold's training.

  Fold k's pseudo-labels come from fold k's own first-round models alone:
  they never saw fold k's validation images, so no label of those images can
  leak into fold k's second round through the test predictions, and the
  out-of-fold score stays an honest estimate. The round runs in
  workdir/pseudo_round (its own checkpoints, resumable like the first) on the
  first round's fold split: workdir/folds.csv is copied there, never
  recomputed. Its outputs then replace the workdir's submission, oof and
  scores, and the first round's are kept as round1_*.
  """
  from saltjax.inference import predict
  from saltjax.training import pseudo_labels

  p = config.pseudo_label
  extra, counts = {}, {}
  for fold, probs in sorted(first.fold_test_probs.items()):
    chosen, masks = pseudo_labels.select(probs, p.low, p.high, p.max_uncertain_fraction)
    extra[fold] = (data.test_images[chosen], masks)
    counts[str(fold)] = int(len(chosen))
    logging.info(
        "Pseudo-labelling fold %d: %d of %d test images are confident" " (fold %d's own models)",
        fold,
        len(chosen),
        len(probs),
        fold,
    )
  round_dir = workdir / workdir_lib.PSEUDO_ROUND
  round_dir.mkdir(exist_ok=True)
  _copy_fold_split(workdir, round_dir)
  train_folds(config, round_dir, data, fold_of, mesh, extra=extra)
  scores = predict.predict_and_submit(config, round_dir, data=data, mesh=mesh).scores
  scores["pseudo_label"] = {
      "labels_from": "each fold's own first-round models (test predictions of the models"
      " that never saw that fold's validation images)",
      "num_images": counts,
      "low": p.low,
      "high": p.high,
      "max_uncertain_fraction": p.max_uncertain_fraction,
      "round1_oof_score": first.scores["oof_score"],
  }
  if jax.process_index() == 0:
    for name in (workdir_lib.SUBMISSION_CSV, workdir_lib.OOF_CSV, workdir_lib.SCORES_JSON):
      workdir_lib.write_text((workdir / name).read_text(), workdir / f"round1_{name}")
  predict.publish_round(workdir, round_dir, scores)
  return scores


def _copy_fold_split(workdir: pathlib.Path, round_dir: pathlib.Path) -> None:
  """The parent's folds.csv in the round's workdir, so that its training and its
  out-of-fold prediction use the very split the first round used."""
  parent, copy = workdir / workdir_lib.FOLDS_CSV, round_dir / workdir_lib.FOLDS_CSV
  if not parent.is_file():
    raise errors.WorkdirError(
        f"{parent} is missing: the pseudo-label round needs the first round's fold split;"
        " use a new --workdir"
    )
  text = parent.read_text()
  if copy.is_file() and copy.read_text() != text:
    raise errors.WorkdirError(
        f"{copy} differs from {parent}: the pseudo-label round must use the first round's"
        f" fold split; delete {round_dir} to run the round again, or use a new --workdir"
    )
  if jax.process_index() == 0:
    workdir_lib.write_text(text, copy)

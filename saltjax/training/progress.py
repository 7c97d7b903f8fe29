"""Where folds stand: each fold's progress, and a group's resume points read and written.

A fold resumes from its `latest` checkpoint (`resume_fold`); the folds
trained together (`FoldGroup`) hold their models in memory between saves,
and `save_group` writes them, the models a resume point refers to first.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax

from saltjax import checkpoints as ckpt_lib
from saltjax import parallel
from saltjax.training.job import Job
from saltjax.training.state import fold_slice, model_variables


@dataclasses.dataclass
class FoldProgress:
  """Where a fold's training stands; saved as the `latest` checkpoint's meta."""

  fold: int
  epoch: int = 0  # epochs finished
  best_score: float = -1.0
  best_epoch: int = -1
  plateau_wait: int = 0
  swa_count: int = 0
  history: list = dataclasses.field(default_factory=list)

  def meta(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_meta(cls, fold: int, meta: dict) -> "FoldProgress":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in meta.items() if k in fields}, "fold": fold})

  def summary(self, num_train: int, num_val: int) -> dict:
    return {
        "fold": self.fold,
        "val_score": self.best_score,
        "best_epoch": self.best_epoch,
        "num_train": num_train,
        "num_val": num_val,
        "history": self.history,
    }


@dataclasses.dataclass
class FoldGroup:
  """The folds trained together, and what they hold in memory between saves."""

  folds: list[int]
  progress: list[FoldProgress]
  checkpoints: list[ckpt_lib.FoldCheckpoints]
  state: Any  # TrainState with a leading fold axis
  best: Any  # the best-validation variables of each fold (leading fold axis)
  best_scores: jax.Array  # (F,) float32 on the device: the best's validation scores
  swa: Any  # the running weight average of each fold (leading fold axis)
  snapshots: list[list]  # per fold: (epoch, variables) not yet written
  val_counts: list[int]  # held-out images per fold
  val_data: tuple  # the held-out batches on the device (`feeders.validation_data`)
  val_counts_on_device: jax.Array  # (F,) float32: `val_counts`, for the epoch programs
  saved_best_epoch: list[int]
  saved_epoch: int
  saved_at: float


def resume_fold(job: Job, fold: int, checkpoints):
  """(state, progress, best, swa) of a fold from its latest checkpoint, or fresh."""
  state = job.new_state()
  variables = model_variables(state)
  latest = checkpoints.latest.latest_step()
  if latest is None:
    return state, FoldProgress(fold), variables, variables
  state, meta = checkpoints.latest.restore(latest, state, checkpoints.fingerprint)
  progress = FoldProgress.from_meta(fold, meta)
  logging.info("Fold %d: resumed from epoch %d.", fold, progress.epoch)
  best = swa = model_variables(state)
  if progress.best_epoch > 0:
    best, _ = checkpoints.best.restore(progress.best_epoch, best, checkpoints.fingerprint)
  if progress.swa_count:
    # The average as of that epoch: a later one may exist when the crash
    # came between the swa and the latest save.
    swa, _ = checkpoints.swa.restore(progress.epoch, swa, checkpoints.fingerprint)
  return state, progress, best, swa


def save_group(group: FoldGroup, epoch: int) -> None:
  """Writes each fold's resume point; the models it refers to are written first.

  Snapshots, a new best model and the weight average are written and
  finished before `latest` is started, so a `latest` on disk never refers
  to a model that is not; `latest` itself (the largest) is written in the
  background while the next epoch trains. Older best/swa steps are deleted
  only once that `latest` is complete (`FoldCheckpoints.prune`).
  """
  new_best = [
      p.best_epoch > 0 and p.best_epoch != saved
      for p, saved in zip(group.progress, group.saved_best_epoch)
  ]
  # One copy of the stacked arrays to the host, which orbax makes anyway;
  # slicing the folds out of it is then free, where slicing each of the
  # ~1,500 device arrays per fold would dispatch (and first compile) an op.
  state, best, swa = jax.device_get(
      (
          parallel.readable_on_every_host(group.state),
          group.best if any(new_best) else None,
          group.swa if group.progress[0].swa_count else None,
      )
  )
  for i, (fold, progress, checkpoints) in enumerate(
      zip(group.folds, group.progress, group.checkpoints)
  ):
    model_meta = {"fold": fold}
    for snap_epoch, variables in group.snapshots[i]:
      val = progress.history[snap_epoch - 1]["val_score"]
      checkpoints.save_model(
          "snapshots", snap_epoch, variables, {**model_meta, "epoch": snap_epoch, "val_score": val}
      )
    group.snapshots[i] = []
    if new_best[i]:
      checkpoints.save_model(
          "best",
          progress.best_epoch,
          fold_slice(best, i),
          {**model_meta, "epoch": progress.best_epoch, "val_score": progress.best_score},
      )
      group.saved_best_epoch[i] = progress.best_epoch
    if progress.swa_count:
      checkpoints.save_model(
          "swa",
          epoch,
          fold_slice(swa, i),
          {**model_meta, "epoch": epoch, "count": progress.swa_count},
      )
    for store in (checkpoints.best, checkpoints.snapshots, checkpoints.swa):
      store.finish()
    checkpoints.save_latest(epoch, fold_slice(state, i), progress.meta())
  group.saved_epoch, group.saved_at = epoch, time.monotonic()

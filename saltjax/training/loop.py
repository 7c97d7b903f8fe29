"""Training: F folds at once, one jitted step over a leading fold axis.

The story of training, top-down: `train_folds` resumes each fold
(`progress`) and trains the folds that stand at the same epoch together, as
one group; a group's epoch reads step -> log -> validate -> save. The pieces
live beside this module: the train state (`state`), the pure step functions
(`steps`), what every fold of a run shares (`job`), the batches (`feeders`),
SIGTERM (`preemption`) and the weight average's BatchNorm pass (`swa`).

Each fold model has its own params, BatchNorm statistics, optimiser state and
learning-rate scale, and is fed its own fold's batches; stacking F of them
along a leading axis turns F small steps (batch 32 leaves a GPU idle) into one
big one. The host syncs with the device once per epoch; checkpoints are
written in the background, at most every `config.checkpoint_every_seconds`.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from saltjax import checkpoints as ckpt_lib
from saltjax import parallel
from saltjax import workdir as workdir_lib
from saltjax.errors import NonFiniteError, Preempted
from saltjax.model import tta
from saltjax.training import feeders
from saltjax.training import preemption
from saltjax.training.job import Job
from saltjax.training.optimizers import cycle_end_epochs
from saltjax.training.progress import FoldGroup, resume_fold, save_group
from saltjax.training.state import fold_slice, model_variables, stack_folds
from saltjax.training.steps import ModelsInMemory, loss_name_for_epoch
from saltjax.training.swa import recompute_batch_stats


def train_folds(
    job: Job,
    workdir: pathlib.Path,
    folds: list[int],
    data,
    fold_of: np.ndarray,
    extra: dict | None = None,
) -> list[dict]:
  """Trains `folds` together (resuming each from its checkpoints); their summaries.

  `extra`: {fold: (images, masks)} added to that fold's training side only
  (pseudo-labels). Finished folds are skipped; folds resumed at different
  epochs are trained in groups that stand at the same epoch.
  """
  workdir = pathlib.Path(workdir)
  summaries = {}
  for fold in folds:
    done = workdir_lib.read_done(workdir, fold)
    if done is not None:
      logging.info("Fold %d already trained (val score %.4f): skipped.", fold, done["val_score"])
      summaries[fold] = done
  todo = [k for k in folds if k not in summaries]
  checkpoints = {
      k: ckpt_lib.FoldCheckpoints(workdir_lib.fold_dir(workdir, k), job.config, asynchronous=True)
      for k in todo
  }
  try:
    resumed = {k: resume_fold(job, k, checkpoints[k]) for k in todo}
    by_epoch: dict[int, list[int]] = {}
    for k in todo:
      by_epoch.setdefault(resumed[k][1].epoch, []).append(k)
    for group_folds in by_epoch.values():
      summaries.update(
          _train_group(
              job,
              workdir,
              group_folds,
              data,
              fold_of,
              extra,
              [checkpoints[k] for k in group_folds],
              [resumed[k] for k in group_folds],
          )
      )
  finally:
    for c in checkpoints.values():
      c.close()
  return [summaries[k] for k in folds]


def _train_group(job: Job, workdir, folds, data, fold_of, extra, checkpoints, resumed):
  """Trains `folds`, resumed at the same epoch, together to the end; their summaries."""
  config = job.config
  feeder = feeders.create_feeder(job, folds, data, fold_of, extra)
  first = resumed[0][1].epoch
  group = _start_group(job, folds, data, fold_of, checkpoints, resumed)
  cycle_ends = set(cycle_end_epochs(config))
  logging.info("Training fold(s) %s together from epoch %d.", folds, first)
  for epoch in range(first, config.num_epochs):
    _train_epoch(job, workdir, group, feeder, epoch, cycle_ends)
  return _finish_group(job, workdir, group, feeder, fold_of)


def _start_group(job: Job, folds, data, fold_of, checkpoints, resumed) -> FoldGroup:
  """The group's resumed states and models, stacked over the folds on the device."""
  config, mesh = job.config, job.mesh
  val_counts = [int((fold_of == k).sum()) for k in folds]
  best, best_scores, swa, val_counts_on_device = parallel.place_host_values(
      (
          stack_folds([r[2] for r in resumed]),
          np.array([r[1].best_score for r in resumed], np.float32),
          stack_folds([r[3] for r in resumed]),
          np.array(val_counts, np.float32),
      ),
      parallel.replicated(mesh),
      "the best models, their scores and the weight averages",
  )
  return FoldGroup(
      folds=folds,
      progress=[r[1] for r in resumed],
      checkpoints=checkpoints,
      state=job.place_state(stack_folds([r[0] for r in resumed])),
      best=best,
      best_scores=best_scores,
      swa=swa,
      snapshots=[[] for _ in folds],
      val_counts=val_counts,
      val_data=feeders.validation_data(config, data, folds, fold_of, mesh),
      val_counts_on_device=val_counts_on_device,
      saved_best_epoch=[r[1].best_epoch for r in resumed],
      saved_epoch=resumed[0][1].epoch,
      saved_at=time.monotonic(),
  )


def _train_epoch(job: Job, workdir, group: FoldGroup, feeder, epoch: int, cycle_ends: set):
  """One epoch of the group: step -> log -> validate -> save; after SIGTERM, `Preempted`."""
  config, folds = job.config, group.folds
  profiling = epoch + 1 == config.get("profile_epoch", 0)
  if profiling:
    jax.profiler.start_trace(str(workdir / workdir_lib.TENSORBOARD))
  started = time.time()
  compile_before = sum(p.compile_seconds for p in job.programs.values())
  pending, val_sums, improved = _run_epoch(job, group, feeder, epoch)
  # The epoch's one host sync: step metrics, validation and choices together.
  host_steps, host_val, host_improved, lr_scales = jax.device_get(
      (pending, val_sums, improved, group.state.lr_scale)
  )
  if profiling:
    jax.profiler.stop_trace()
    logging.info("Profile of epoch %d written to %s.", epoch + 1, workdir / workdir_lib.TENSORBOARD)
  compiling = sum(p.compile_seconds for p in job.programs.values()) - compile_before
  if isinstance(host_steps, dict):  # stacked by the epoch program: one dict per step
    host_steps = [{k: v[j] for k, v in host_steps.items()} for j in range(job.steps_per_epoch)]
  _record_epoch(job, group, epoch, host_steps, host_val, lr_scales, started, compiling)
  _update_models(job, group, epoch, host_improved, cycle_ends)
  save, stop = preemption.agree_on_save_and_stop(config, group)
  if save or epoch + 1 == config.num_epochs:
    save_group(group, epoch + 1)
  if job.writer is not None:
    job.writer.flush()
  if stop:
    for c in group.checkpoints:
      c.finish()
    raise Preempted(
        f"stopped by SIGTERM after epoch {epoch + 1} of fold(s)"
        f" {', '.join(map(str, folds))}; the resume point is saved in {workdir}: run the"
        " same command again to go on"
    )


def _finish_group(job: Job, workdir, group: FoldGroup, feeder, fold_of) -> dict:
  """The weight averages' BatchNorm statistics and models, and each fold's summary."""
  config, mesh, folds = job.config, job.mesh, group.folds
  summaries = {}
  swa = jax.device_get(group.swa) if group.progress[0].swa_count else None
  for i, fold in enumerate(folds):
    progress = group.progress[i]
    if progress.swa_count:
      fold_swa = recompute_batch_stats(
          config,
          job.model,
          fold_slice(swa, i),
          functools.partial(feeder.fold_epoch, i),
          mesh,
          config.num_epochs,
      )
      group.checkpoints[i].save_model(
          "swa",
          config.num_epochs + 1,
          fold_swa,
          {"epoch": config.num_epochs, "fold": fold, "count": progress.swa_count},
      )
    group.checkpoints[i].finish()
    summary = progress.summary(
        num_train=int((fold_of != fold).sum()), num_val=int((fold_of == fold).sum())
    )
    if jax.process_index() == 0:
      workdir_lib.write_json(summary, workdir_lib.done_path(workdir, fold))
    summaries[fold] = summary
  return summaries


def _run_epoch(job: Job, group: FoldGroup, feeder, epoch: int) -> tuple:
  """The epoch's train steps and its end (`make_epoch_end_fn`); results stay on the device.

  Returns (step metrics: {name: (steps, F)} from the one program, or a list
  of each step's {name: (F,)}; validation sums (F, 2); improved
  (F,)) and leaves the new state, best models, their scores and the weight
  average in `group`. On the device input path the whole epoch is one
  program; with tf.data, one program a step (the host makes the batches)
  and one for the epoch's end.
  """
  config, repl = job.config, parallel.replicated(job.mesh)
  loss_name = loss_name_for_epoch(config, epoch)
  models = ModelsInMemory(group.best, group.best_scores, group.swa)
  epoch_values = parallel.place_host_values(
      (
          np.int32(epoch),
          np.float32(group.progress[0].swa_count),
          np.bool_(0 <= config.swa_from_epoch <= epoch + 1),
      ),
      repl,
      "the epoch's number and weight-average count",
  )
  if isinstance(feeder, feeders.DeviceFeeder):
    group.state, models, pending, val_sums, improved = job.device_epoch_program(loss_name)(
        group.state,
        models,
        feeder.data,
        feeder.folds,
        group.val_data,
        group.val_counts_on_device,
        *epoch_values,
    )
  else:
    step_fn = job.train_step_program(loss_name)
    pending = []
    images_per_step = config.batch_size * len(group.folds)
    bar = tqdm.tqdm(
        total=job.steps_per_epoch * images_per_step,
        unit="img",
        desc=f"fold(s) {','.join(map(str, group.folds))} epoch {epoch + 1}/{config.num_epochs}",
        disable=not tta.progress_enabled(config),
        leave=False,
    )
    batches = feeder.epoch(epoch)
    try:
      for _, batch in zip(range(job.steps_per_epoch), batches):
        group.state, step_metrics = step_fn(group.state, batch)
        pending.append(step_metrics)
        bar.update(images_per_step)
    finally:
      batches.close()  # stops the feeder's thread
      bar.close()
    models, val_sums, improved = job.epoch_end_program()(
        group.state, models, group.val_data, group.val_counts_on_device, *epoch_values[1:]
    )
  group.best, group.best_scores, group.swa = models
  return pending, val_sums, improved


def _record_epoch(
    job: Job,
    group: FoldGroup,
    epoch: int,
    host_steps: list[dict],
    host_val: np.ndarray,
    lr_scales: np.ndarray,
    started: float,
    compile_seconds: float = 0.0,
) -> None:
  """Non-finite steps, the epoch's history record and the logs, per fold.

  The log gives the epoch's seconds and its training images per second (all
  folds, compilation in the epoch left out).
  """
  config, writer = job.config, job.writer
  seconds = time.time() - started
  images_per_second = (
      job.steps_per_epoch
      * config.batch_size
      * len(group.folds)
      / max(seconds - compile_seconds, 1e-9)
  )
  first_step = epoch * job.steps_per_epoch + 1
  for i, fold in enumerate(group.folds):
    steps = [{k: v[i] for k, v in m.items()} for m in host_steps]
    _check_finite(config, group, i, epoch, steps, first_step)
    good = [m for m in steps if m["finite"]]
    if writer is not None:
      _write_train_scalars(writer, config.log_every_steps, fold, steps, first_step)
    val_score, val_iou = (float(x) for x in host_val[i] / group.val_counts[i])
    lr = float(job.lr_fn((epoch + 1) * job.steps_per_epoch - 1)) * float(lr_scales[i])
    record = {
        "epoch": epoch + 1,
        "train_loss": float(np.mean([float(m["loss"]) for m in good])) if good else float("nan"),
        "val_score": val_score,
        "val_iou": val_iou,
        "learning_rate": lr,
        "loss_name": loss_name_for_epoch(config, epoch),
        "seconds": seconds,
        "images_per_second": images_per_second,
    }
    group.progress[i].history.append(record)
    if writer is not None:
      writer.write_scalars(
          (epoch + 1) * job.steps_per_epoch,
          {f"fold_{fold}/{k}": v for k, v in record.items() if k != "loss_name"},
      )
    logging.info(
        "fold %d epoch %3d/%d  loss %.4f  val score %.4f  val IoU %.4f  lr %.2e  %.1fs"
        "  %.0f img/s",
        fold,
        epoch + 1,
        config.num_epochs,
        record["train_loss"],
        val_score,
        val_iou,
        lr,
        record["seconds"],
        images_per_second,
    )


def _check_finite(config, group: FoldGroup, i: int, epoch: int, steps: list, first_step: int):
  """The i-th fold's non-finite steps: `NonFiniteError` (config.nonfinite='stop') or a warning."""
  fold = group.folds[i]
  bad = [first_step + j for j, m in enumerate(steps) if not m["finite"]]
  if bad and config.nonfinite == "stop":
    last = group.saved_epoch
    where = (
        f"the last good checkpoint is epoch {last} in" f" {group.checkpoints[i].latest.directory}"
        if last
        else "no checkpoint was written yet"
    )
    others = [k for k in group.folds if k != fold]
    together = (
        f" Fold(s) {', '.join(map(str, others))}, trained together with fold {fold}, stopped"
        " with it and resume from the same epoch."
        if others
        else ""
    )
    raise NonFiniteError(
        f"non-finite loss or gradient at step {bad[0]} (fold {fold}, epoch {epoch + 1});"
        f" training stopped and {where}.{together} Lower config.optimizer.learning_rate, set"
        " config.optimizer.grad_clip, or set config.nonfinite='skip' to skip such steps."
    )
  if bad:
    logging.warning(
        "fold %d epoch %d: skipped %d non-finite step(s), first at step %d",
        fold,
        epoch + 1,
        len(bad),
        bad[0],
    )


def _write_train_scalars(writer, every: int, fold: int, steps: list, first_step: int) -> None:
  """The fold's train metrics, each a mean over `every` steps (the finite ones)."""
  for start in range(0, len(steps), every):
    window = [m for m in steps[start : start + every] if m["finite"]]
    if window:
      writer.write_scalars(
          first_step + min(start + every, len(steps)) - 1,
          {
              f"fold_{fold}/train_{k}": float(np.mean([m[k] for m in window]))
              for k in window[0]
              if k != "finite"
          },
      )


def _update_models(
    job: Job, group: FoldGroup, epoch: int, improved: np.ndarray, cycle_ends: set
) -> None:
  """The host's side of the epoch's model choices: progress, plateau and snapshots.

  The epoch's program already replaced each improved fold's best model and
  updated the weight average on the device (`make_epoch_end_fn`); `improved`
  is its verdict, which the progress records follow.
  """
  config = job.config
  factors = np.ones(len(group.folds), np.float32)
  for i, progress in enumerate(group.progress):
    progress.epoch = epoch + 1
    if improved[i]:
      progress.best_score = progress.history[-1]["val_score"]
      progress.best_epoch, progress.plateau_wait = epoch + 1, 0
    else:
      progress.plateau_wait += 1
    if (
        config.schedule.name == "plateau"
        and progress.plateau_wait >= config.schedule.plateau_patience
    ):
      factors[i] = config.schedule.plateau_factor
      progress.plateau_wait = 0
      logging.info(
          "fold %d: no better validation score for %d epochs; lr scale lowered by %g",
          group.folds[i],
          config.schedule.plateau_patience,
          config.schedule.plateau_factor,
      )
  if (factors != 1).any():
    group.state = group.state.replace(lr_scale=group.state.lr_scale * jnp.asarray(factors))
  if epoch + 1 in cycle_ends:
    # A few per run: worth a copy to the host, where it waits to be written.
    snapshot = jax.device_get(model_variables(group.state))
    for i in range(len(group.folds)):
      group.snapshots[i].append((epoch + 1, fold_slice(snapshot, i)))
  if 0 <= config.swa_from_epoch <= epoch + 1:
    for progress in group.progress:
      progress.swa_count += 1

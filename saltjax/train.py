"""Training: one fold, or every fold in turn, with resumable checkpoints.

Reads top-down as the story of training: the model and its initial
variables, the learning-rate schedule and optimiser, the jitted train step,
validation, checkpoints, and `train_fold` / `train_and_evaluate`, which wire
them together.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import sys
import time
from typing import Any, Callable

from clu import metric_writers
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from saltjax import checkpoints as ckpt_lib
from saltjax import data as data_lib
from saltjax import inference
from saltjax import input_pipeline
from saltjax import losses
from saltjax import metrics
from saltjax import models
from saltjax import parallel


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss or gradient."""


class TrainState(train_state.TrainState):
  """Params, optimiser state, BatchNorm statistics and a host-set LR scale.

  `lr_scale` multiplies every update; reduce-on-plateau lowers it between
  epochs (the optax schedule itself is a pure function of the step).
  """
  batch_stats: Any
  lr_scale: jax.Array

  def apply_gradients(self, *, grads, **kwargs):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    updates = jax.tree.map(lambda u: u * self.lr_scale.astype(u.dtype), updates)
    return self.replace(step=self.step + 1,
                        params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **kwargs)


# ----------------------------------------------------------------- model ---

def create_model(config, dtype=None) -> models.UNet:
  return models.create_model(config.model, dtype=dtype)


def initialized(key, model, image_size: int) -> dict:
  dummy = jnp.zeros((1, image_size, image_size, 1), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))({"params": key}, dummy)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def initial_variables(config, model) -> dict:
  variables = initialized(jax.random.key(config.seed), model, config.image_size)
  if config.model.pretrained:
    from saltjax import pretrained
    encoder = pretrained.load_resnet50(config.model.pretrained,
                                       in_channels=config.model.in_channels)
    variables = pretrained.merge_encoder(variables, encoder)
    logging.info("Encoder initialised from %s", config.model.pretrained)
  return variables


# ----------------------------------------------------- schedule, optimiser ---

def cycle_end_epochs(config) -> list[int]:
  """Epoch counts at which a cosine cycle ends (a snapshot is kept there)."""
  s = config.schedule
  if s.name != "cosine_restarts":
    return []
  ends, length, end = [], float(s.cycle_epochs), float(s.warmup_epochs)
  while True:
    end += max(1, round(length))
    if end > config.num_epochs:
      return ends
    ends.append(int(end))
    length *= s.cycle_mult


def create_learning_rate_fn(config, steps_per_epoch: int) -> Callable:
  """The learning rate as a function of the step (optax schedules joined)."""
  s, base = config.schedule, config.optimizer.learning_rate
  warmup = s.warmup_epochs * steps_per_epoch
  if s.name == "cosine_restarts":
    # SGDR (Loshchilov & Hutter): cosine from base to min_lr, restarted at
    # every cycle end; cycles may grow by cycle_mult. The boundaries count
    # from the end of the warm-up: the join below already shifts this whole
    # schedule by `warmup` steps, so the restarts land on cycle_end_epochs.
    schedules, boundaries, length, total = [], [], float(s.cycle_epochs), 0
    starts = [0] + cycle_end_epochs(config)
    for i in range(len(starts) + 1):
      steps = max(1, round(length)) * steps_per_epoch
      schedules.append(optax.cosine_decay_schedule(base, steps, alpha=s.min_lr / base))
      total += steps
      boundaries.append(total)
      length *= s.cycle_mult
    main = optax.join_schedules(schedules, boundaries[:-1])
  elif s.name in ("constant", "plateau"):
    main = optax.constant_schedule(base)
  elif s.name == "step":
    main = optax.exponential_decay(base, s.step_epochs * steps_per_epoch,
                                   s.step_factor, staircase=True)
  else:
    raise ValueError(f"unknown config.schedule.name {s.name!r}: use"
                     " cosine_restarts, constant, step or plateau")
  if not warmup:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(s.min_lr, base, warmup), main], [warmup])


def create_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
  o = config.optimizer
  if o.name == "adam":
    tx = optax.adam(learning_rate_fn)
  elif o.name == "adamw":
    tx = optax.adamw(learning_rate_fn, weight_decay=o.weight_decay)
  elif o.name == "sgd":
    tx = optax.sgd(learning_rate_fn, momentum=o.momentum, nesterov=o.nesterov)
  elif o.name == "rmsprop":
    tx = optax.rmsprop(learning_rate_fn, momentum=o.momentum)
  else:
    raise ValueError(f"unknown config.optimizer.name {o.name!r}: use adam, adamw, sgd or rmsprop")
  if o.weight_decay and o.name != "adamw":
    tx = optax.chain(optax.add_decayed_weights(o.weight_decay), tx)  # L2 penalty
  if o.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx


# ----------------------------------------------------------------- steps ---

def train_step(state: TrainState, batch: dict, *, loss_config, loss_name: str,
               skip_nonfinite: bool) -> tuple[TrainState, dict]:
  """One optimisation step on a (globally sharded) batch. Pure."""

  def loss_fn(params):
    outputs, new_model_state = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"],
        train=True, mutable=["batch_stats"])
    loss, aux = losses.model_loss(outputs, batch["mask"], loss_config, name=loss_name)
    return loss, (new_model_state["batch_stats"], aux, outputs["logits"])

  (loss, (batch_stats, aux, logits)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if skip_nonfinite:
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                             new_state, state)
  pred, truth = logits > 0, batch["mask"] > 0.5
  inter = jnp.sum(pred & truth, axis=(1, 2))
  union = jnp.sum(pred | truth, axis=(1, 2))
  step_metrics = {
      "loss": loss, "finite": finite,
      "iou": jnp.mean(jnp.where(union == 0, 1.0, inter / jnp.maximum(union, 1))),
      **{f"loss_{k}": v for k, v in aux.items()},
  }
  return new_state, step_metrics


def compile_train_steps(config, mesh) -> dict[str, Callable]:
  """One jitted step per loss in use (two for the two-stage recipe)."""
  names = {config.loss.name}
  if config.loss.second_from_epoch >= 0:
    names.add(config.loss.second_name)
  for name in names:
    losses.get_loss_fn(name)  # fail early, naming the option
  if config.nonfinite not in ("stop", "skip"):
    raise ValueError(f"unknown config.nonfinite {config.nonfinite!r}: use 'stop' or 'skip'")
  repl, shard = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return {name: jax.jit(
      functools.partial(train_step, loss_config=config.loss, loss_name=name,
                        skip_nonfinite=config.nonfinite == "skip"),
      in_shardings=(repl, shard), out_shardings=(repl, repl), donate_argnums=0)
          for name in names}


def loss_name_for_epoch(config, epoch: int) -> str:
  """The loss of 0-based `epoch`; `second_from_epoch` counts from 1, as the logs do."""
  second = config.loss.second_from_epoch
  return config.loss.second_name if 0 <= second <= epoch + 1 else config.loss.name


def predict_probs(infer_fn, variables, images: np.ndarray, *, batch_size: int,
                  config, mesh, progress: str | None = None) -> dict[str, np.ndarray]:
  """Probabilities at 101x101 for `images` (uint8, N x 101 x 101)."""
  outputs: dict[str, list] = {}
  batches = input_pipeline.inference_batches(
      images, batch_size=batch_size, image_size=config.image_size,
      resize_mode=config.resize_mode)
  bar = tqdm.tqdm(total=len(images), desc=progress, unit="img",
                  disable=not (progress and progress_enabled(config)), leave=False)
  for batch, valid in batches:
    out = infer_fn(variables, parallel.global_from_replicated(batch, mesh)["image"])
    for k, v in out.items():
      outputs.setdefault(k, []).append(parallel.to_host(v)[:valid])
    bar.update(valid)
  bar.close()
  return {k: np.concatenate(v) for k, v in outputs.items()}


def progress_enabled(config) -> bool:
  return bool(config.progress) and sys.stderr.isatty() and jax.process_index() == 0


# ------------------------------------------------------------------ a job ---

@dataclasses.dataclass
class Job:
  """What every fold of one run shares, built (and compiled) once per process.

  Every fold uses the same optimiser object and the same steps per epoch, so
  the jitted steps see identical state structures and compile only once.
  """
  config: Any
  mesh: Any
  model: Any
  steps_per_epoch: int
  lr_fn: Callable
  tx: optax.GradientTransformation
  initial_variables: dict
  train_steps: dict
  infer_fn: Callable
  writer: Any

  @classmethod
  def create(cls, config, mesh, fold_of: np.ndarray, writer, num_extra: int = 0) -> "Job":
    steps_per_epoch = steps_per_epoch_for(config, mesh, fold_of, num_extra)
    model = create_model(config)
    lr_fn = create_learning_rate_fn(config, steps_per_epoch)
    return cls(config=config, mesh=mesh, model=model, steps_per_epoch=steps_per_epoch,
               lr_fn=lr_fn, tx=create_optimizer(config, lr_fn),
               # On the host: each fold's state gets fresh device buffers, which
               # the train step may then donate.
               initial_variables=jax.device_get(initial_variables(config, model)),
               train_steps=compile_train_steps(config, mesh),
               infer_fn=jax.jit(inference.make_infer_fn(model, config.resize_mode, "none")),
               writer=writer)

  def new_state(self) -> TrainState:
    v = self.initial_variables
    return TrainState.create(apply_fn=self.model.apply, params=v["params"],
                             batch_stats=v["batch_stats"], tx=self.tx,
                             lr_scale=jnp.ones((), jnp.float32))


def local_batch_size(config) -> int:
  return config.batch_size // jax.process_count()


def steps_per_epoch_for(config, mesh, fold_of: np.ndarray, num_extra: int = 0) -> int:
  """Steps per epoch (the same for every fold); checks the batch sizes fit.

  `num_extra` training examples (pseudo-labels) join every fold.
  """
  parallel.check_batch_size(config.batch_size, mesh, "config.batch_size")
  parallel.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
  smallest = min(int((fold_of != k).sum()) for k in range(config.num_folds)) + num_extra
  steps_per_epoch = (smallest // jax.process_count()) // local_batch_size(config)
  if steps_per_epoch == 0:
    raise ValueError(f"a fold has only {smallest} training images, fewer than"
                     f" config.batch_size={config.batch_size}")
  return steps_per_epoch


# ---------------------------------------------------------------- a fold ---

def _swa_update(swa, variables, count):
  return jax.tree.map(lambda a, v: a + (v - a) / (count + 1), swa, variables)


def train_fold(job: Job, workdir: pathlib.Path, fold: int, data,
               fold_of: np.ndarray, extra: tuple | None = None) -> dict:
  """Trains one fold (resuming from its latest checkpoint); returns its summary.

  `extra`: (images, masks) added to the fold's training side only (pseudo-labels).
  """
  fold_dir = workdir / f"fold_{fold}"
  done_path = fold_dir / "done.json"
  if done_path.exists():
    summary = json.loads(done_path.read_text())
    logging.info("Fold %d already trained (val score %.4f): skipped.", fold,
                 summary["val_score"])
    return summary
  config, mesh, writer = job.config, job.mesh, job.writer

  train_idx, val_idx = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
  # Each process trains on its own shard of the fold's training ids.
  n_proc, proc = jax.process_count(), jax.process_index()
  per_process = len(train_idx) // n_proc
  local_idx = train_idx[proc * per_process:(proc + 1) * per_process]
  steps_per_epoch = job.steps_per_epoch
  images, masks = data.train_images[local_idx], data.train_masks[local_idx]
  if extra is not None:
    per_process = len(extra[0]) // n_proc
    mine = slice(proc * per_process, (proc + 1) * per_process)
    images = np.concatenate([images, extra[0][mine]])
    masks = np.concatenate([masks, extra[1][mine]])
  for_epoch = input_pipeline.train_dataset(
      images, masks,
      batch_size=local_batch_size(config), image_size=config.image_size,
      resize_mode=config.resize_mode, augment_spec=config.augment,
      seed=config.seed * 100 + fold)

  model, state = job.model, job.new_state()
  checkpoints = ckpt_lib.FoldCheckpoints(fold_dir, config)
  meta = {"epoch": 0, "best_score": -1.0, "best_epoch": -1, "plateau_wait": 0,
          "swa_count": 0, "history": []}
  swa = None
  latest = checkpoints.latest.latest_step()
  if latest is not None:
    state, meta = checkpoints.latest.restore(latest, state, checkpoints.fingerprint)
    logging.info("Fold %d: resumed from epoch %d.", fold, meta["epoch"])
    if meta["swa_count"]:
      # The average as of that epoch: a later one may exist when the crash
      # came between the swa and the latest save.
      swa, _ = checkpoints.swa.restore(meta["epoch"],
                                       {"params": state.params, "batch_stats": state.batch_stats},
                                       checkpoints.fingerprint)
  state = jax.device_put(state, parallel.replicated(mesh))

  steps, infer_fn, lr_fn = job.train_steps, job.infer_fn, job.lr_fn
  cycle_ends = set(cycle_end_epochs(config))
  val_images, val_masks = data.train_images[val_idx], data.train_masks[val_idx]

  for epoch in range(meta["epoch"], config.num_epochs):
    started, loss_name = time.time(), loss_name_for_epoch(config, epoch)
    step_fn, pending, epoch_losses = steps[loss_name], [], []
    bar = tqdm.tqdm(total=steps_per_epoch * config.batch_size, unit="img",
                    desc=f"fold {fold} epoch {epoch + 1}/{config.num_epochs}",
                    disable=not progress_enabled(config), leave=False)
    batches = input_pipeline.epoch_iterator(for_epoch, epoch)
    for i, batch in zip(range(steps_per_epoch), batches):
      state, step_metrics = step_fn(state, parallel.global_from_local(batch, mesh))
      pending.append(step_metrics)
      bar.update(config.batch_size)
      step = epoch * steps_per_epoch + i + 1
      if step % config.log_every_steps == 0 or i + 1 == steps_per_epoch:
        # The only host sync of the loop: at logging intervals.
        logged = _flush(pending, fold=fold, epoch=epoch, first_step=step - len(pending) + 1,
                        nonfinite=config.nonfinite, checkpoints=checkpoints)
        epoch_losses += logged["losses"]
        writer.write_scalars(step, {f"fold_{fold}/train_{k}": v
                                    for k, v in logged["means"].items()})
        pending = []
    bar.close()

    # Validation on the held-out fold, at 101x101, threshold 0.5, no TTA.
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    val_probs = predict_probs(infer_fn, variables, val_images,
                              batch_size=config.eval_batch_size, config=config, mesh=mesh)["probs"]
    val_pred = val_probs > 0.5
    val_score = metrics.competition_score(val_masks, val_pred)
    val_iou = float(metrics.iou_per_image(val_masks, val_pred).mean())
    lr = float(lr_fn((epoch + 1) * steps_per_epoch - 1)) * float(state.lr_scale)
    record = {"epoch": epoch + 1, "train_loss": float(np.mean(epoch_losses)),
              "val_score": val_score, "val_iou": val_iou, "learning_rate": lr,
              "loss_name": loss_name, "seconds": time.time() - started}
    meta["history"].append(record)
    writer.write_scalars((epoch + 1) * steps_per_epoch, {
        f"fold_{fold}/{k}": v for k, v in record.items() if k != "loss_name"})
    logging.info("fold %d epoch %3d/%d  loss %.4f  val score %.4f  val IoU %.4f"
                 "  lr %.2e  %.1fs", fold, epoch + 1, config.num_epochs,
                 record["train_loss"], val_score, val_iou, lr, record["seconds"])

    meta["epoch"] = epoch + 1
    model_meta = {"epoch": epoch + 1, "val_score": val_score, "fold": fold}
    if val_score > meta["best_score"]:
      meta.update(best_score=val_score, best_epoch=epoch + 1, plateau_wait=0)
      checkpoints.save_model("best", epoch + 1, jax.device_get(variables), model_meta)
    else:
      meta["plateau_wait"] += 1
    if config.schedule.name == "plateau" and meta["plateau_wait"] >= config.schedule.plateau_patience:
      state = state.replace(lr_scale=state.lr_scale * config.schedule.plateau_factor)
      meta["plateau_wait"] = 0
      logging.info("fold %d: no better validation score for %d epochs; lr scale now %.3g",
                   fold, config.schedule.plateau_patience, float(state.lr_scale))
    if epoch + 1 in cycle_ends:
      checkpoints.save_model("snapshots", epoch + 1, jax.device_get(variables), model_meta)
    if 0 <= config.swa_from_epoch <= epoch + 1:
      swa = jax.device_get(variables) if swa is None else jax.device_get(
          _swa_update(swa, variables, meta["swa_count"]))
      meta["swa_count"] += 1
      checkpoints.save_model("swa", epoch + 1, swa, {**model_meta, "count": meta["swa_count"]})
    checkpoints.save_latest(epoch + 1, state, meta)
    writer.flush()

  if swa is not None:
    swa = recompute_batch_stats(config, model, swa, for_epoch, mesh, config.num_epochs)
    checkpoints.save_model("swa", config.num_epochs + 1, swa,
                           {"epoch": config.num_epochs, "fold": fold, "count": meta["swa_count"]})
  checkpoints.close()
  summary = {"fold": fold, "val_score": meta["best_score"], "best_epoch": meta["best_epoch"],
             "num_train": int(len(train_idx)), "num_val": int(len(val_idx)),
             "history": meta["history"]}
  if jax.process_index() == 0:
    data_lib.write_text_atomic(json.dumps(summary, indent=1), done_path)
  return summary


def recompute_batch_stats(config, model, variables, for_epoch, mesh, epoch: int):
  """BatchNorm statistics for averaged (SWA) weights: one pass over the data.

  As torch.optim.swa_utils.update_bn: the averaged statistics are discarded
  and each BatchNorm's running mean and variance become the plain mean, over
  one pass, of every batch's mean and variance (torch's momentum=None), not a
  moving average started from the averaged statistics. The batch variance is
  flax's, the biased one, which is also what the model's running statistics
  hold in ordinary training; torch stores the unbiased one, larger by
  n / (n - 1) with n = batch * height * width values per channel (>= 128 at
  the deepest map of the quick config): a negligible difference, and keeping
  flax's convention keeps the SWA statistics comparable with the others.
  """
  keep = models.BATCH_NORM_MOMENTUM

  @jax.jit
  def update(variables, mean_so_far, images, count):
    # From zeroed running statistics one train-mode update leaves exactly
    # (1 - momentum) * the batch's statistics (train mode normalises with the
    # batch's own statistics, so the running values do not enter the forward).
    zeros = jax.tree.map(jnp.zeros_like, mean_so_far)
    _, new = model.apply({"params": variables["params"], "batch_stats": zeros}, images,
                         train=True, mutable=["batch_stats"])
    return jax.tree.map(lambda m, s: m + (s / (1 - keep) - m) / count,
                        mean_so_far, new["batch_stats"])

  mean = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  count = 0
  for batch in input_pipeline.epoch_iterator(for_epoch, epoch):
    count += 1
    mean = update(variables, mean, parallel.global_from_local(batch, mesh)["image"],
                  jnp.float32(count))
  if not count:
    raise ValueError("no training batch to recompute the SWA BatchNorm statistics on")
  return jax.device_get({"params": variables["params"], "batch_stats": mean})


def _flush(pending: list[dict], *, fold, epoch, first_step, nonfinite, checkpoints) -> dict:
  """Brings the pending step metrics to the host; stops on a non-finite step."""
  host = jax.device_get(pending)
  bad = [first_step + j for j, m in enumerate(host) if not m["finite"]]
  if bad and nonfinite == "stop":
    last = checkpoints.latest.latest_step()
    where = (f"the last good checkpoint is epoch {last} in {checkpoints.latest.directory}"
             if last is not None else "no checkpoint was written yet")
    raise NonFiniteError(
        f"non-finite loss or gradient at step {bad[0]} (fold {fold}, epoch {epoch + 1});"
        f" training stopped and {where}. Lower config.optimizer.learning_rate, set"
        " config.optimizer.grad_clip, or set config.nonfinite='skip' to skip such steps.")
  if bad:
    logging.warning("fold %d epoch %d: skipped %d non-finite step(s), first at step %d",
                    fold, epoch + 1, len(bad), bad[0])
  good = [m for m in host if m["finite"]]
  means = {k: float(np.mean([m[k] for m in good])) for k in host[0] if k != "finite"} if good else {}
  return {"losses": [float(m["loss"]) for m in good], "means": means}


# ------------------------------------------------------------- the whole job ---

def write_training_curves(config, workdir: pathlib.Path) -> None:
  """training_curves.png from the histories of the workdir's finished folds."""
  if jax.process_index() != 0:
    return
  from saltjax import plots
  done = {k: workdir / f"fold_{k}" / "done.json" for k in range(config.num_folds)}
  histories = {k: json.loads(p.read_text())["history"] for k, p in done.items() if p.exists()}
  plots.write_training_curves(workdir, histories, cycle_end_epochs(config))


def folds_to_train(config) -> list[int]:
  if config.fold == -1:
    return list(range(config.num_folds))
  if not 0 <= config.fold < config.num_folds:
    raise ValueError(f"config.fold={config.fold} is out of range for"
                     f" config.num_folds={config.num_folds} (use -1 for all folds)")
  return [config.fold]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data=None) -> dict:
  """Trains the config's folds; when they are all of them, predicts."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = parallel.create_mesh()
  logging.info("Devices: %d (%s), processes: %d", mesh.size, jax.devices()[0].platform,
               jax.process_count())
  data = data if data is not None else data_lib.load(config)
  fold_of = data_lib.folds_for_run(config, data, workdir)
  summaries = train_folds(config, workdir, data, fold_of, mesh)
  if config.fold != -1:
    return {"folds": summaries}
  from saltjax import predict
  test_probs = []
  scores = predict.predict_and_submit(config, workdir, data=data, mesh=mesh,
                                      test_probs_out=test_probs)
  if config.pseudo_label.enabled:
    scores = pseudo_label_round(config, workdir, data, fold_of, mesh, test_probs[0], scores)
  return scores


def train_folds(config, workdir: pathlib.Path, data, fold_of, mesh, extra=None) -> list:
  """Trains the config's folds in turn (finished ones are skipped)."""
  writer = metric_writers.create_default_writer(
      str(workdir / "tensorboard"), just_logging=jax.process_index() > 0)
  job, summaries = None, []
  for fold in folds_to_train(config):
    if job is None and not (workdir / f"fold_{fold}" / "done.json").exists():
      job = Job.create(config, mesh, fold_of, writer,
                       num_extra=0 if extra is None else len(extra[0]))
    summaries.append(train_fold(job, workdir, fold, data, fold_of, extra))
  writer.close()
  write_training_curves(config, workdir)
  return summaries


def pseudo_label_round(config, workdir: pathlib.Path, data, fold_of, mesh,
                       test_probs: np.ndarray, first_scores: dict) -> dict:
  """A second round with confident test predictions added to every fold's training.

  It runs in workdir/pseudo_round (its own checkpoints, resumable like the
  first); its outputs then replace the workdir's submission, oof and scores,
  and the first round's are kept as round1_*.
  """
  from saltjax import predict, pseudo
  p = config.pseudo_label
  chosen, masks = pseudo.select(test_probs, p.low, p.high, p.max_uncertain_fraction)
  logging.info("Pseudo-labelling: %d of %d test images are confident", len(chosen),
               len(test_probs))
  round_dir = workdir / "pseudo_round"
  round_dir.mkdir(exist_ok=True)
  extra = (data.test_images[chosen], masks)
  train_folds(config, round_dir, data, fold_of, mesh, extra=extra)
  scores = predict.predict_and_submit(config, round_dir, data=data, mesh=mesh)
  scores["pseudo_label"] = {"num_images": int(len(chosen)), "low": p.low, "high": p.high,
                            "max_uncertain_fraction": p.max_uncertain_fraction,
                            "round1_oof_score": first_scores["oof_score"]}
  if jax.process_index() == 0:
    for name in ("submission.csv", "oof.csv", "scores.json"):
      data_lib.write_text_atomic((workdir / name).read_text(), workdir / f"round1_{name}")
    for name in ("submission.csv", "oof.csv"):
      data_lib.write_text_atomic((round_dir / name).read_text(), workdir / name)
    data_lib.write_text_atomic(json.dumps(scores, indent=1), workdir / "scores.json")
  return scores

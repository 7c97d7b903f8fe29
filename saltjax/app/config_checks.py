"""Config values checked before anything runs or is written.

All problems are reported at once, each naming its `config.` key.
"""

from __future__ import annotations

import json
import pathlib

from saltjax.input_pipeline import augment_spec
from saltjax import errors
from saltjax import geometry
from saltjax import parallel
from saltjax.inference import trained_config
from saltjax.model import imagenet_weights
from saltjax.model import tta
from saltjax.model import unet
from saltjax.training import losses
from saltjax.training import optimizers
from saltjax.training import steps as steps_lib
from saltjax import workdir as workdir_lib

ConfigError = errors.ConfigError


# Keys that may change between runs sharing a workdir (they don't change
# what a fold's training computes).
_FREE_KEYS = (
    "mode",
    "fold",
    "progress",
    "log_every_steps",
    "predict",
    "compilation_cache",
    "distributed",
    "distributed_heartbeat_timeout_seconds",
    "distributed_initialization_timeout_seconds",
    "eval_batch_size",
    "parallel_folds",
    "fold_strategy",
    "state_sharding",
    "checkpoint_every_seconds",
    "segment",
    "predict_data_dir",
    "compile_for",
)


def check(config) -> None:
  """Raises one `ConfigError` listing every bad value, each naming its `config.` key."""
  problems = []

  def need(ok, key, message):
    if not ok:
      problems.append(f"config.{key}={_get(config, key)!r}: {message}")

  _check_run(config, need)
  _check_input(config, need)
  _check_training(config, need)
  _check_schedule(config, need)
  _check_loss(config, need)
  _check_prediction(config, need)
  try:
    augment_spec.parse(config.augment)
  except ValueError as e:
    problems.append(str(e))
  _check_model(config, need)
  _check_data(config, need)
  if config.get("compile_for", ""):
    from saltjax.app import tpu_slices

    try:
      tpu_slices.slice_spec(config.compile_for)
    except ConfigError as e:
      problems.append(str(e))
  if problems:
    raise ConfigError("bad config:\n  " + "\n  ".join(problems))


def _check_run(config, need) -> None:
  """The mode and the folds."""
  need(
      config.mode in ("train", "predict", "segment"), "mode", "use 'train', 'predict' or 'segment'"
  )
  need(isinstance(config.num_folds, int) and config.num_folds >= 2, "num_folds", "must be >= 2")
  need(
      isinstance(config.fold, int) and -1 <= config.fold < max(config.num_folds, 0),
      "fold",
      f"must be -1 (all) or 0..{config.num_folds - 1}",
  )
  need(config.stratify_by in ("coverage", "depth"), "stratify_by", "use 'coverage' or 'depth'")


def _check_input(config, need) -> None:
  """Image sizes and batch sizes, and where the batches are made."""
  need(config.resize_mode in geometry.RESIZE_MODES, "resize_mode", "use 'resize' or 'pad'")
  need(
      config.get("input_pipeline", "tfdata") in ("tfdata", "device"),
      "input_pipeline",
      "use 'tfdata' (host) or 'device' (on the accelerator, no TensorFlow)",
  )
  need(
      config.image_size >= 101 if config.resize_mode == "pad" else config.image_size >= 32,
      "image_size",
      "must be >= 101 with resize_mode='pad', >= 32 with 'resize'",
  )
  need(
      config.image_size % 32 == 0,
      "image_size",
      "must be a multiple of 32 (the encoder's total stride)",
  )
  need(config.batch_size > 0, "batch_size", "must be positive")
  need(
      steps_lib.fold_strategy(config) in steps_lib.FOLD_STRATEGIES,
      "fold_strategy",
      f"use one of {', '.join(steps_lib.FOLD_STRATEGIES)}",
  )
  need(
      steps_lib.state_sharding_name(config) in parallel.STATE_SHARDINGS,
      "state_sharding",
      f"use one of {', '.join(parallel.STATE_SHARDINGS)}",
  )
  need(config.eval_batch_size > 0, "eval_batch_size", "must be positive")
  need(config.predict.batch_size > 0, "predict.batch_size", "must be positive")


def _check_training(config, need) -> None:
  """The epochs, the folds' grouping, checkpoints' cadence and the optimiser."""
  need(config.num_epochs > 0, "num_epochs", "must be positive")
  need(config.log_every_steps > 0, "log_every_steps", "must be positive")
  need(
      isinstance(config.get("parallel_folds", 1), int) and config.get("parallel_folds", 1) >= 0,
      "parallel_folds",
      "must be >= 0 (0: every fold at once)",
  )
  need(
      config.get("checkpoint_every_seconds", 0) >= 0,
      "checkpoint_every_seconds",
      "must be >= 0 (0: every epoch)",
  )
  need(config.optimizer.learning_rate > 0, "optimizer.learning_rate", "must be positive")
  need(
      config.optimizer.name in optimizers.OPTIMIZERS,
      "optimizer.name",
      f"use one of {', '.join(optimizers.OPTIMIZERS)}",
  )
  need(config.optimizer.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
  need(config.optimizer.grad_clip >= 0, "optimizer.grad_clip", "must be >= 0")


def _check_schedule(config, need) -> None:
  """The learning-rate schedule."""
  s = config.schedule
  need(
      s.name in optimizers.SCHEDULES,
      "schedule.name",
      f"use one of {', '.join(optimizers.SCHEDULES)}",
  )
  need(s.cycle_epochs > 0, "schedule.cycle_epochs", "must be positive")
  need(s.cycle_mult >= 1, "schedule.cycle_mult", "must be >= 1")
  need(
      0 <= s.min_lr <= config.optimizer.learning_rate,
      "schedule.min_lr",
      "must be between 0 and optimizer.learning_rate",
  )
  need(s.warmup_epochs >= 0, "schedule.warmup_epochs", "must be >= 0")
  need(s.step_epochs > 0, "schedule.step_epochs", "must be positive")
  need(0 < s.step_factor <= 1, "schedule.step_factor", "must be in (0, 1]")
  need(0 < s.plateau_factor <= 1, "schedule.plateau_factor", "must be in (0, 1]")


def _check_loss(config, need) -> None:
  """The losses, and what a non-finite step does."""
  for key in ("loss.name", "loss.second_name"):
    need(
        _get(config, key) in losses.PER_IMAGE_LOSSES,
        key,
        f"unknown loss; use one of {', '.join(losses.PER_IMAGE_LOSSES)}",
    )
  need(config.nonfinite in ("stop", "skip"), "nonfinite", "use 'stop' or 'skip'")


def _check_prediction(config, need) -> None:
  """Prediction (TTA, checkpoints, threshold) and the pseudo-label round."""
  need(
      config.predict.tta in tta.TTA_CHOICES,
      "predict.tta",
      f"use one of {', '.join(tta.TTA_CHOICES)}",
  )
  need(
      all(
          p.strip() in workdir_lib.CHECKPOINT_STORES for p in config.predict.checkpoints.split("+")
      ),
      "predict.checkpoints",
      f"use {', '.join(workdir_lib.CHECKPOINT_STORES)} or several joined by '+'",
  )
  need(
      config.predict.threshold < 0 or 0 < config.predict.threshold < 1,
      "predict.threshold",
      "must be in (0, 1), or -1 to tune it",
  )
  pl = config.pseudo_label
  need(
      0 <= pl.low < pl.high <= 1,
      "pseudo_label.low",
      "pseudo_label.low and .high must satisfy 0 <= low < high <= 1",
  )
  need(
      0 <= pl.max_uncertain_fraction <= 1,
      "pseudo_label.max_uncertain_fraction",
      "must be in [0, 1]",
  )
  need(
      not pl.enabled or config.fold == -1,
      "pseudo_label.enabled",
      "pseudo-labelling needs every fold trained first (config.fold=-1)",
  )


def _check_model(config, need) -> None:
  """The model's shape, dtype and pretrained weights."""
  m = config.model
  need(
      len(m.stage_sizes) == 4 and all(int(n) > 0 for n in m.stage_sizes),
      "model.stage_sizes",
      "must be four positive block counts, e.g. (3, 4, 6, 3)",
  )
  need(m.encoder_width > 0, "model.encoder_width", "must be positive")
  need(
      len(m.decoder_channels) == 5 and all(int(c) > 0 for c in m.decoder_channels),
      "model.decoder_channels",
      "must be five positive widths",
  )
  need(m.in_channels in (1, 3), "model.in_channels", "must be 1 or 3")
  need(m.scse_reduction > 0, "model.scse_reduction", "must be positive")
  need(m.upsample in ("nearest", "bilinear"), "model.upsample", "use 'nearest' or 'bilinear'")
  need(m.dtype in ("auto", "float32", "bfloat16"), "model.dtype", "use auto, float32 or bfloat16")
  need(
      m.final_block in unet.FINAL_BLOCKS,
      "model.final_block",
      "use auto, plain or space_to_depth",
  )
  need(
      m.final_block != "space_to_depth" or unet.space_to_depth_allowed(m.upsample, m.hypercolumn),
      "model.final_block",
      "space_to_depth needs model.upsample='nearest' and model.hypercolumn=False",
  )
  hub = imagenet_weights.hub_repo(m.pretrained)
  need(
      not m.pretrained or hub or pathlib.Path(m.pretrained).expanduser().is_file(),
      "model.pretrained",
      "no such file, and not 'imagenet' or a timm/resnet50.<tag> name",
  )
  need(
      not m.pretrained or (tuple(m.stage_sizes) == (3, 4, 6, 3) and m.encoder_width == 64),
      "model.pretrained",
      "ResNet50 weights need model.stage_sizes=(3,4,6,3) and"
      " model.encoder_width=64 (or --config.model.pretrained='' to train from scratch)",
  )


def _check_data(config, need) -> None:
  """The data: a Kaggle-layout directory, or the synthetic set's sizes."""
  need(
      config.data_dir == "" or pathlib.Path(config.data_dir).expanduser().is_dir(),
      "data_dir",
      "no such directory",
  )
  need(
      config.synthetic.num_train >= 2 * config.num_folds,
      "synthetic.num_train",
      "too few images for the folds",
  )
  need(config.synthetic.num_test >= 0, "synthetic.num_test", "must be >= 0")


def _get(config, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def check_same_training_config(previous: dict, current: dict, path) -> None:
  """A workdir's runs must share the training config (resume, other folds)."""
  before = {
      k: v for k, v in trained_config.flatten(previous).items() if k.split(".")[0] not in _FREE_KEYS
  }
  now = {
      k: v
      for k, v in trained_config.flatten(json.loads(json.dumps(current, default=list))).items()
      if k.split(".")[0] not in _FREE_KEYS
  }
  before.setdefault("input_pipeline", "tfdata")  # workdirs from before the option
  changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
  if changed:
    details = "; ".join(
        f"config.{k} was {before.get(k)!r}, now {now.get(k)!r}" for k in changed[:8]
    )
    raise ConfigError(
        f"{path} holds a run with another training config ({details}); use a new"
        " --workdir, or the same config to resume"
    )

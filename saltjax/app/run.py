"""What main.py runs: set-up, checks, the workdir's lock, then training, prediction
or segmentation.

Imports form a tree: run -> {process, job, config_checks}; job -> {training,
inference} -> {model, input_pipeline, data, checkpoints, ...}. The process's
set-up is in `saltjax.app.process`, the job's orchestration (train the folds,
predict, a pseudo-label round) in `saltjax.app.job`.

Every expected failure (a `SaltjaxError`: bad data, bad config value,
unusable checkpoint, non-finite loss, a workdir that cannot be written or is
in use) ends the program with a one-paragraph message and exit status 1; a
programming error keeps its traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys

import jax
import numpy as np

from saltjax.app import config_checks
from saltjax.app import job as job_lib
from saltjax.app import process
from saltjax.app import host_loss
from saltjax import errors
from saltjax import workdir as workdir_lib


def default_workdir(config_file: str | None) -> str:
  name = pathlib.Path(config_file).stem if config_file else "run"
  return os.path.join("runs", "fold" if name in ("predict", "segment") else name)


def main(config, workdir: str | None, config_file: str | None = None) -> int:
  process.set_up_process()
  workdir = workdir or default_workdir(config_file)
  if config.get("compile_for", ""):  # one process compiles for every host: nothing to join
    return _compile_only(config, workdir)
  if config.get("distributed", False):
    host_loss.set_workdir(workdir)  # named when a process is lost
    try:
      process.initialize_distributed(config)
    except errors.ConfigError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
  if "://" in workdir:
    # pathlib would quietly turn gs://b/x into a local folder gs:/b/x.
    print(
        f"error: --workdir={workdir}: URLs are not supported; use a mounted path"
        " (e.g. gcsfuse or NFS) shared by every host",
        file=sys.stderr,
    )
    return 1
  workdir = pathlib.Path(workdir)
  with process.stop_training_on_sigterm():
    try:
      if config.mode == "train":
        config_checks.check(config)
      elif config.mode not in ("predict", "segment"):
        raise errors.ConfigError(
            f"bad config:\n  config.mode={config.mode!r}: use 'train', 'predict' or 'segment'"
        )
      # A prediction's model and data come from the workdir's config.json: its
      # config is checked once merged with them (config_for_prediction).
      process.enable_compilation_cache(config)
      if config.mode == "predict":
        scores = _predict(config, workdir, _defaults(config_file))
      elif config.mode == "segment":
        return _segment(config, workdir)
      else:
        scores = _train(config, workdir)
    except errors.Preempted as e:
      print(f"error: {e}", file=sys.stderr)
      return e.exit_code
    except errors.SaltjaxError as e:
      host_loss.hold_if_lost(e)
      if os.environ.get("SALTJAX_DEBUG"):
        raise
      print(f"error: {e}", file=sys.stderr)
      return 1
    except Exception as e:
      host_loss.hold_if_lost(e)  # a lost process of the job ends this one: exit 75, one line
      raise
  if "oof_score" in scores:
    print(
        f"OOF score {scores['oof_score']:.4f} at threshold {scores['threshold']:.2f};"
        f" wrote {workdir / workdir_lib.SUBMISSION_CSV}"
    )
  return 0


def _compile_only(config, workdir: str) -> int:
  """The job compiled for config.compile_for's TPU slice (saltjax.app.compile_only)."""
  from saltjax.app import compile_only

  try:
    if config.mode != "train":
      raise errors.ConfigError(
          f"config.compile_for={config.compile_for!r} compiles a training job:"
          f" config.mode must be 'train', not {config.mode!r}"
      )
    config_checks.check(config)
    compile_only.run(config, pathlib.Path(workdir))
  except errors.SaltjaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def job_lock(workdir: pathlib.Path):
  """The workdir's lock, held for the job: by its process 0 when there are several."""
  if jax.process_count() == 1:
    return workdir_lib.locked(workdir)
  return workdir_lib.locked(workdir, process_index=jax.process_index(), allgather=_allgather_ints)


def _allgather_ints(value: int) -> list[int]:
  """Every process's `value`, in process order, on every process."""
  from jax.experimental import multihost_utils

  return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(value)))]


def _train(config, workdir: pathlib.Path) -> dict:
  """Validates the data, the devices and the workdir, then trains (and predicts)."""
  from saltjax.data import dataset as data_lib
  from saltjax.model import imagenet_weights
  from saltjax import parallel
  from saltjax.training.job import steps_per_epoch_for
  # The ImageNet weights are found (or fetched), data read and validated, and
  # the batch sizes checked, before the workdir gets anything.
  imagenet_weights.resolve_weights(config.model.pretrained, config.cache_dir)
  data = data_lib.load(config)
  steps_per_epoch_for(
      config, parallel.create_mesh(), data_lib.fold_assignment(config, data)["fold"].to_numpy()
  )
  workdir_lib.check_writable(workdir)
  with job_lock(workdir):
    _record_run(config, workdir)
    from saltjax.data import gray_stats  # what configs/segment.py maps sections to

    gray_stats.write(workdir, data.train_images)
    return job_lib.train_and_evaluate(config, str(workdir), data=data)


def _defaults(config_file: str | None):
  """The config file's own values (to tell which ones the command line changed)."""
  if not config_file or not os.path.isfile(config_file):
    return None
  import runpy

  return runpy.run_path(config_file)["get_config"]()


def _predict(config, workdir: pathlib.Path, defaults=None) -> dict:
  from saltjax.inference import predict
  from saltjax.inference import trained_config

  config = trained_config.config_for_prediction(config, workdir, defaults)
  config_checks.check(config)
  workdir_lib.check_writable(workdir)
  with job_lock(workdir):
    return predict.predict_workdir(config, workdir).scores


def _segment(config, workdir: pathlib.Path) -> int:
  """Whole seismic sections through the workdir's ensemble (configs/segment.py)."""
  from saltjax.inference import trained_config
  from saltjax.sections import options
  from saltjax.sections import segment

  with job_lock(workdir) if workdir.is_dir() else _no_lock():
    options.check_config(config)
    trained = trained_config.config_for_prediction(config, workdir)
    config_checks.check(trained)
    segment.run(trained, workdir)
  return 0


@contextlib.contextmanager
def _no_lock():
  yield  # a missing workdir is refused by the segmenter, naming it


def _record_run(config, workdir: pathlib.Path) -> None:
  """The resolved config and package versions, saved with every run (by process 0).

  Every process checks a previous run's config, so that all refuse together.
  """
  saved = workdir / workdir_lib.CONFIG_JSON
  if saved.exists():
    previous = json.loads(saved.read_text())
    config_checks.check_same_training_config(previous, config.to_dict(), saved)
  if jax.process_index() != 0:
    return
  workdir_lib.write_text(config.to_json_best_effort(indent=1), saved)
  workdir_lib.write_json(process.package_versions(), workdir / workdir_lib.VERSIONS_JSON)

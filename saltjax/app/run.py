"""What main.py runs: set-up, checks, then training and/or prediction.

Imports form a tree: run -> {train, predict} -> {models, inference,
input_pipeline, checkpoints, ...}. This module wires the job together
(`train_and_evaluate`: train the folds, predict, a pseudo-label round); the
trainer and the predictor know nothing of each other.

Every expected failure (a `SaltjaxError`: bad data, bad config value,
unusable checkpoint, non-finite loss, a workdir that cannot be written or is
in use) ends the program with a one-paragraph message and exit status 1; a
programming error keeps its traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import platform
import signal
import sys
import warnings
from importlib import metadata

import jax
import ml_collections
import numpy as np

from saltjax.app import config_checks
from saltjax.app import host_loss
from saltjax import errors
from saltjax import workdir as workdir_lib

_PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "tensorflow-cpu",
    "tensorflow",
    "tensorflow-datasets",
    "ml-collections",
    "numpy",
    "opencv-python-headless",
    "scikit-learn",
)


def package_versions(names=_PACKAGES) -> dict:
  """Python's version and those of the named packages that are installed."""
  versions = {"python": platform.python_version()}
  for name in names:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return versions


def default_workdir(config_file: str | None) -> str:
  name = pathlib.Path(config_file).stem if config_file else "run"
  return os.path.join("runs", "fold" if name in ("predict", "segment") else name)


def enable_compilation_cache(config) -> None:
  """JAX's persistent compilation cache: later folds and runs skip compiling."""
  cache = config.get("compilation_cache", "")
  if cache:
    cache = os.path.expanduser(cache)
    drop_unreadable_cache_entries(cache)
    jax.config.update("jax_compilation_cache_dir", cache)


# Cache entries already found readable, by name -> [size, mtime_ns]: JAX
# never rewrites an entry, so one that kept its size and time needs no second
# look. Without it every start decompressed the whole cache (0.12 CPU-s for
# the test suite's 151 tiny programs, more for full-size models' programs,
# paid by every process of a job).
VERIFIED_CACHE_ENTRIES = "saltjax-verified-entries.json"


def drop_unreadable_cache_entries(cache_dir: str) -> list[str]:
  """Deletes compilation-cache entries that cannot be decompressed.

  JAX writes an entry in place: a full disk or a kill leaves it truncated, and
  JAX then warns about it on every later run without replacing it. Deleted,
  it is compiled and written again. Entries found readable before (same size
  and modification time, recorded in VERIFIED_CACHE_ENTRIES) are not read
  again.
  """
  try:
    from jax._src import compilation_cache
  except ImportError:  # the layout of another JAX version: nothing checked
    return []
  if not os.path.isdir(cache_dir):
    return []
  record = pathlib.Path(cache_dir, VERIFIED_CACHE_ENTRIES)
  try:
    verified = json.loads(record.read_text())
  except (OSError, ValueError):
    verified = {}
  readable, dropped = {}, []
  for path in pathlib.Path(cache_dir).glob("*-cache"):
    try:
      stat = path.stat()
      signature = [stat.st_size, stat.st_mtime_ns]
      if verified.get(path.name) != signature:
        compilation_cache.decompress_executable(path.read_bytes())
    except OSError:
      continue
    except Exception:  # zlib/zstandard's errors for a truncated entry
      for stale in (path, path.with_name(path.name[: -len("-cache")] + "-atime")):
        with contextlib.suppress(OSError):
          stale.unlink()
      dropped.append(path.name)
      continue
    readable[path.name] = signature
  if readable != verified:
    # Best effort: a cache dir this process cannot write is still used.
    with contextlib.suppress(errors.WorkdirError):
      workdir_lib.write_text(json.dumps(readable, sort_keys=True), record)
  if dropped:
    logging.info("Deleted %d unreadable compilation-cache entries in %s", len(dropped), cache_dir)
  return dropped


def set_up_process() -> None:
  """Process-wide set-up, once, before any library does its work.

  TensorFlow is not imported here: `saltjax.host_tensorflow` sets it up where
  data is first read, so that a config error is reported in seconds.
  """
  logging.getLogger().setLevel(logging.INFO)
  # Orbax and TFDS report every file operation at INFO through absl, and
  # asyncio repeats a failed background write once per pending task.
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  logging.getLogger("absl").addFilter(_drop_orbax_background_errors)
  sys.unraisablehook = _quiet_closed_event_loops(sys.unraisablehook)
  warnings.filterwarnings("ignore", module="orbax")


def _drop_orbax_background_errors(record: logging.LogRecord) -> bool:
  """Orbax logs each failed background write (a traceback per array); the failure
  reaches the program as one error, which says what to do."""
  return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _quiet_closed_event_loops(hook):
  """Orbax's abandoned writes complain once per pending task after a failure."""

  def quiet(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
        unraisable.exc_value
    ):
      return
    hook(unraisable)

  return quiet


def _tensorflow_installed() -> bool:
  """Whether TensorFlow can be imported (the GPU image we measure on has none)."""
  import importlib.util

  try:
    return importlib.util.find_spec("tensorflow") is not None
  except (ImportError, ValueError):  # blocked in sys.modules
    return False


def main(config, workdir: str | None, config_file: str | None = None) -> int:
  set_up_process()
  workdir = workdir or default_workdir(config_file)
  if config.get("distributed", False):
    host_loss.set_workdir(workdir)  # named when a process is lost
    try:
      initialize_distributed(config)
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
  previous = signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    if config.mode == "train":
      config_checks.check(config)
    elif config.mode not in ("predict", "segment"):
      raise errors.ConfigError(
          f"bad config:\n  config.mode={config.mode!r}: use 'train', 'predict' or 'segment'"
      )
    # A prediction's model and data come from the workdir's config.json: its
    # config is checked once merged with them (config_for_prediction).
    enable_compilation_cache(config)
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
  finally:
    signal.signal(signal.SIGTERM, previous)
  if "oof_score" in scores:
    print(
        f"OOF score {scores['oof_score']:.4f} at threshold {scores['threshold']:.2f};"
        f" wrote {workdir / workdir_lib.SUBMISSION_CSV}"
    )
  return 0


def initialize_distributed(config) -> None:
  """Joins this process to its multi-host job (`config.distributed=True`).

  `jax.distributed.initialize()` finds the job by itself on a Cloud TPU VM
  and under SLURM (SLURM_JOB_ID, SLURM_PROCID, SLURM_NTASKS, ...: every
  task of `srun` gets them); elsewhere JAX_COORDINATOR_ADDRESS (process 0's
  host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID say it. On CPU the
  processes' collectives go through gloo. A process lost later, or one that
  never joins, ends the others with exit status 75 (saltjax.app.host_loss).
  """
  try:
    host_loss.initialize(config)
  except errors.ConfigError:
    raise  # a bad timeout
  except (ValueError, RuntimeError) as e:
    raise errors.ConfigError(
        f"config.distributed=True, but this process could not join its job ({e})."
        " Run it under SLURM (srun) or on every host of a TPU pod slice, or set"
        " JAX_COORDINATOR_ADDRESS=<process 0's host>:<port>, JAX_NUM_PROCESSES and"
        " JAX_PROCESS_ID on each process"
    ) from e


def job_lock(workdir: pathlib.Path):
  """The workdir's lock, held for the job: by its process 0 when there are several."""
  if jax.process_count() == 1:
    return workdir_lib.locked(workdir)
  return workdir_lib.locked(workdir, process_index=jax.process_index(), allgather=_allgather_ints)


def _allgather_ints(value: int) -> list[int]:
  """Every process's `value`, in process order, on every process."""
  from jax.experimental import multihost_utils

  return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(value)))]


def _on_sigterm(signum, frame) -> None:
  from saltjax.training import trainer

  logging.warning("SIGTERM: saving the resume point after this epoch, then stopping.")
  trainer.request_stop()


def _train(config, workdir: pathlib.Path) -> dict:
  """Validates the data, the devices and the workdir, then trains (and predicts)."""
  from saltjax.data import dataset as data_lib
  from saltjax.model import imagenet_weights
  from saltjax import parallel
  from saltjax.training import trainer
  # The ImageNet weights are found (or fetched), data read and validated, and
  # the batch sizes checked, before the workdir gets anything.
  imagenet_weights.resolve_weights(config.model.pretrained, config.cache_dir)
  data = data_lib.load(config)
  trainer.steps_per_epoch_for(
      config, parallel.create_mesh(), data_lib.fold_assignment(config, data)["fold"].to_numpy()
  )
  workdir_lib.check_writable(workdir)
  with job_lock(workdir):
    _record_run(config, workdir)
    from saltjax.data import gray_stats  # what configs/segment.py maps sections to

    gray_stats.write(workdir, data.train_images)
    return train_and_evaluate(config, str(workdir), data=data)


def _defaults(config_file: str | None):
  """The config file's own values (to tell which ones the command line changed)."""
  if not config_file or not os.path.isfile(config_file):
    return None
  import runpy

  return runpy.run_path(config_file)["get_config"]()


def _predict(config, workdir: pathlib.Path, defaults=None) -> dict:
  from saltjax.inference import predict

  config = config_checks.config_for_prediction(config, workdir, defaults)
  workdir_lib.check_writable(workdir)
  with job_lock(workdir):
    return predict.predict_and_submit(config, workdir).scores


def _segment(config, workdir: pathlib.Path) -> int:
  """Whole seismic sections through the workdir's ensemble (configs/segment.py)."""
  from saltjax.sections import segment

  with job_lock(workdir) if workdir.is_dir() else _no_lock():
    segment.run(config, workdir)
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
  workdir_lib.write_json(package_versions(), workdir / workdir_lib.VERSIONS_JSON)


# ------------------------------------------------------------- the job ---


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
  from saltjax.training import trainer

  folds = folds_to_train(config)
  todo = [k for k in folds if workdir_lib.read_done(workdir, k) is None]
  writer = _metric_writer(workdir)
  summaries = {}
  try:
    if not todo:  # nothing to compile: every fold is finished
      return [workdir_lib.read_done(workdir, k) for k in folds]
    num_extra = {k: len(v[0]) for k, v in extra.items()} if extra is not None else 0
    job = trainer.Job.create(config, mesh, fold_of, writer, num_extra=num_extra)
    for group in fold_groups(config, folds):
      summaries.update(zip(group, trainer.train_folds(job, workdir, group, data, fold_of, extra)))
  finally:
    writer.close()
  write_training_curves(config, workdir)
  return [summaries[k] for k in folds]


class _LoggingWriter:
  """Metrics to the log alone, where TensorFlow (and so clu's writers) is missing."""

  def write_scalars(self, step: int, scalars: dict) -> None:
    logging.debug("step %d: %s", step, scalars)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def _metric_writer(workdir: pathlib.Path):
  """clu's TensorBoard + log writer; the log alone on a machine without TensorFlow."""
  if not _tensorflow_installed():
    logging.info("TensorFlow is not installed: metrics go to the log, not TensorBoard.")
    return _LoggingWriter()
  from saltjax import host_tensorflow  # noqa: F401  (before clu's writers import it)
  from clu import metric_writers

  return metric_writers.create_default_writer(
      str(workdir / workdir_lib.TENSORBOARD), just_logging=jax.process_index() > 0
  )


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
    for name in (workdir_lib.SUBMISSION_CSV, workdir_lib.OOF_CSV):
      workdir_lib.write_text((round_dir / name).read_text(), workdir / name)
    workdir_lib.write_json(scores, workdir / workdir_lib.SCORES_JSON)
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

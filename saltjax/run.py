"""What main.py runs: set-up, config checks, then training or prediction.

Every expected failure (bad data, bad config value, unusable checkpoint,
non-finite loss) ends the program with a one-paragraph message and exit
status 1, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import platform
import sys
from importlib import metadata

import jax

from saltjax import config_checks


_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-cpu",
             "tensorflow", "tensorflow-datasets", "ml-collections", "numpy",
             "opencv-python-headless", "scikit-learn")


def package_versions() -> dict:
  versions = {"python": platform.python_version()}
  for name in _PACKAGES:
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
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(config, workdir: str | None, config_file: str | None = None) -> int:
  logging.getLogger().setLevel(logging.INFO)
  # Orbax and TFDS report every file operation at INFO through absl.
  logging.getLogger("absl").setLevel(logging.WARNING)
  from saltjax import checkpoints, layout, train  # heavy imports after flags
  if config.get("distributed", False):
    jax.distributed.initialize()
  workdir = workdir or default_workdir(config_file)
  if "://" in workdir:
    # pathlib would quietly turn gs://b/x into a local folder gs:/b/x.
    print(f"error: --workdir={workdir}: URLs are not supported; use a mounted path"
          " (e.g. gcsfuse or NFS) shared by every host", file=sys.stderr)
    return 1
  workdir = pathlib.Path(workdir)
  try:
    config_checks.check(config)
    enable_compilation_cache(config)
    if config.mode == "predict":
      from saltjax import predict
      config = config_checks.config_for_prediction(config, workdir)
      scores = predict.predict_and_submit(config, workdir)
    elif config.mode == "segment":
      from saltjax import sections
      scores = sections.run(config, workdir)
    else:
      # Data are read and validated, and the batch sizes checked against them
      # and the devices, before the workdir gets anything.
      from saltjax import data as data_lib
      from saltjax import parallel
      data = data_lib.load(config)
      train.steps_per_epoch_for(config, parallel.create_mesh(),
                                data_lib.fold_assignment(config, data)["fold"].to_numpy())
      _record_run(config, workdir)
      scores = train.train_and_evaluate(config, str(workdir), data=data)
  except (layout.DataError, checkpoints.CheckpointError, config_checks.ConfigError,
          train.NonFiniteError, ValueError, FileNotFoundError) as e:
    if os.environ.get("SALTJAX_DEBUG"):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 1
  if "oof_score" in scores:
    print(f"OOF score {scores['oof_score']:.4f} at threshold {scores['threshold']:.2f};"
          f" wrote {workdir / 'submission.csv'}")
  return 0


def _record_run(config, workdir: pathlib.Path) -> None:
  """The resolved config and package versions, saved with every run."""
  if jax.process_index() != 0:
    return
  from saltjax import data
  workdir.mkdir(parents=True, exist_ok=True)
  saved = workdir / "config.json"
  if saved.exists():
    previous = json.loads(saved.read_text())
    config_checks.check_same_training_config(previous, config.to_dict(), saved)
  data.write_text_atomic(config.to_json_best_effort(indent=1), saved)
  data.write_text_atomic(json.dumps(package_versions(), indent=1), workdir / "versions.json")

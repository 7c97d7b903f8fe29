"""Where the training data comes from, and how it is split into folds."""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np
import pandas as pd

from saltjax.data import folds as folds_lib
from saltjax.data import layout
from saltjax import metrics
from saltjax import workdir as workdir_lib
from saltjax.errors import DataError, WorkdirError


def resolve_data_dir(config) -> pathlib.Path:
  """config.data_dir, or the embedded synthetic dataset (generated once)."""
  if config.data_dir:
    return pathlib.Path(os.path.expanduser(config.data_dir))
  from saltjax.data import synthetic_dataset  # only needed for the default dataset

  cache = pathlib.Path(os.path.expanduser(config.cache_dir))
  try:
    path = synthetic_dataset.ensure_dataset(
        cache,
        num_train=config.synthetic.num_train,
        num_test=config.synthetic.num_test,
        seed=config.synthetic.seed,
    )
  except OSError as e:
    raise WorkdirError(
        workdir_lib.describe_os_error(e, cache).replace("--workdir", "--config.cache_dir")
    ) from e
  logging.info("Embedded synthetic dataset: %s", path)
  return path


def load(config, load_test: bool = True) -> layout.SaltData:
  """Reads (and validates) the data the config names."""
  data_dir = resolve_data_dir(config)
  if config.get("use_tfds", False):
    from saltjax.data import tfds_builders

    return tfds_builders.load(config, data_dir, load_test=load_test)
  return layout.read_layout(data_dir, load_test=load_test)


def load_test(config, data_dir) -> layout.SaltData:
  """The test images of another directory, for predicting with a trained workdir."""
  return layout.read_test_images(pathlib.Path(os.path.expanduser(data_dir)))


def fold_assignment(config, data: layout.SaltData) -> pd.DataFrame:
  """The fold of every training id, as written to workdir/folds.csv."""
  fold_of = folds_lib.assign_folds(
      data.train_masks,
      config.num_folds,
      config.seed,
      depths=data.train_depths,
      stratify_by=config.stratify_by,
  )
  return pd.DataFrame(
      {
          "id": data.train_ids,
          "fold": fold_of,
          "coverage_class": metrics.coverage_class(data.train_masks),
          "depth": data.train_depths,
      }
  )


# The workdir module holds the one atomic writer; these names stay for callers.
write_csv_atomic = workdir_lib.write_csv
write_text_atomic = workdir_lib.write_text


def folds_for_run(config, data: layout.SaltData, workdir: pathlib.Path) -> np.ndarray:
  """The fold of each training id; written once, then reused from the workdir.

  Reusing the saved assignment keeps resumed and later runs (and prediction)
  on exactly the split the first run made.
  """
  path = pathlib.Path(workdir) / workdir_lib.FOLDS_CSV
  if path.exists():
    saved = pd.read_csv(path, dtype={"id": str})
    if list(saved["id"]) != list(data.train_ids) or saved["fold"].max() + 1 != config.num_folds:
      raise DataError(
          f"{path} was made for other training ids or another config.num_folds;"
          " use a new --workdir"
      )
    return saved["fold"].to_numpy()
  frame = fold_assignment(config, data)
  import jax  # every process computes the same split; one writes it

  if jax.process_index() == 0:
    write_csv_atomic(frame, path)
  return frame["fold"].to_numpy()

"""The Kaggle submission file: checked, then written atomically."""

from __future__ import annotations

import collections
import pathlib

import numpy as np
import pandas as pd

from saltjax import errors
from saltjax.data import rle
from saltjax import workdir as workdir_lib

SubmissionError = errors.SubmissionError


def check_submission(
    frame: pd.DataFrame, test_ids: list[str], shape: tuple[int, int] = (101, 101)
) -> None:
  """Raises SubmissionError unless every test id is there once with valid RLE."""
  if list(frame.columns) != ["id", "rle_mask"]:
    raise SubmissionError(f"submission columns are {list(frame.columns)}, not ['id', 'rle_mask']")
  ids = list(frame["id"])
  dupes = [i for i, c in collections.Counter(ids).items() if c > 1]
  missing = sorted(set(test_ids) - set(ids))
  extra = sorted(set(ids) - set(test_ids))
  problems = []
  if dupes:
    problems.append(f"duplicated ids: {dupes[:10]}")
  if missing:
    problems.append(f"{len(missing)} test ids missing, e.g. {missing[:10]}")
  if extra:
    problems.append(f"{len(extra)} ids that are not test ids, e.g. {extra[:10]}")
  for i, code in zip(ids, frame["rle_mask"].fillna("")):
    try:
      rle.decode(code, shape)
    except rle.RLEError as e:
      problems.append(f"id {i}: {e}")
      break
  if problems:
    raise SubmissionError("invalid submission: " + "; ".join(problems))


def write_submission(path: pathlib.Path, test_ids: list[str], masks: np.ndarray) -> pd.DataFrame:
  """Encodes (N, 101, 101) masks, checks the result and writes it atomically."""
  masks = np.asarray(masks)
  if masks.shape[0] != len(test_ids):
    raise SubmissionError(f"{masks.shape[0]} masks for {len(test_ids)} test ids")
  frame = pd.DataFrame({"id": list(test_ids), "rle_mask": [rle.encode(m) for m in masks]})
  check_submission(frame, list(test_ids), masks.shape[1:])
  workdir_lib.write_csv(frame, path)
  return frame

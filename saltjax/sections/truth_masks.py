"""A known salt mask (config.segment.truth): read, and the segmented masks scored against it."""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Sequence

import cv2
import numpy as np

from saltjax.data.layout import DataError
from saltjax import metrics
from saltjax.sections import inputs
from saltjax.sections import tiling


def read_truth(
    path: str | os.PathLike, source: inputs.SectionInput, shape: tuple[int, int]
) -> np.ndarray:
  """The known salt mask of every segmented line: bool (lines, samples, traces).

  path (config.segment.truth): a .npy array or PNG of the section's shape
  (one line); for several lines a 3-D .npy (lines, samples, traces) in the
  order they are segmented, or a .npz holding one array per line, named by
  the line ('inline100', 'crossline7'; or arr_0, arr_1, ... in order).  0
  is sediment, any other value salt.
  """
  path = pathlib.Path(path).expanduser()
  key = f"config.segment.truth={str(path)!r}"
  lines = len(source.sections)
  if not path.is_file():
    raise DataError(f"{key}: no such file")
  suffix = path.suffix.lower()
  try:
    if suffix == ".npy":
      arrays = np.load(path, allow_pickle=False)
      arrays = arrays[None] if arrays.ndim == 2 else arrays
    elif suffix == ".npz":
      with np.load(path, allow_pickle=False) as held:
        names = [sec.label or "line" for sec in source.sections]
        if all(n in held.files for n in names):
          arrays = [held[n] for n in names]
        elif len(held.files) == lines and all(f"arr_{i}" in held.files for i in range(lines)):
          arrays = [held[f"arr_{i}"] for i in range(lines)]
        else:
          raise DataError(
              f"{key}: holds arrays {sorted(held.files)[:10]}; expected one per segmented"
              f" line, named {names[:5]} (or arr_0 to arr_{lines - 1} in that order)"
          )
    elif suffix == ".png":
      image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
      if image is None:
        raise DataError(f"{key}: not a readable PNG image")
      arrays = (image if image.ndim == 2 else image.max(axis=2))[None]
    else:
      raise DataError(f"{key}: use a .npy or .npz array or a PNG")
  except (ValueError, OSError, EOFError) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"{key}: not readable ({e})") from e
  if len(arrays) != lines or any(np.shape(a) != tuple(shape) for a in arrays):
    got = [tuple(np.shape(a)) for a in arrays]
    raise DataError(
        f"{key}: holds {len(arrays)} mask(s) of shape(s) {sorted(set(got))[:3]}; the input has"
        f" {lines} segmented line(s) of {shape[0]} samples x {shape[1]} traces"
        + (" (a 3-D array: one mask per line, in the order segmented)" if lines > 1 else "")
    )
  truth = np.stack([np.asarray(a) for a in arrays])
  if not (np.issubdtype(truth.dtype, np.number) or truth.dtype == bool):
    raise DataError(f"{key}: holds {truth.dtype} values; expected a mask of numbers")
  levels = np.unique(truth)
  if len(levels) > 2 or not np.isfinite(levels).all():
    raise DataError(
        f"{key}: holds {len(levels)} different values; expected a mask (0 for sediment,"
        " one other value such as 1 or 255 for salt)"
    )
  return truth != 0


def truth_counts(truth: np.ndarray, mask: np.ndarray) -> dict:
  """Pixel counts and per-tile competition scores of one line."""
  truth, mask = np.asarray(truth, bool), np.asarray(mask, bool)
  t_tiles, _ = tiling.cut_tiles(truth, tiling.TILE)
  p_tiles, _ = tiling.cut_tiles(mask, tiling.TILE)
  return {
      "tp": int((truth & mask).sum()),
      "fp": int((~truth & mask).sum()),
      "fn": int((truth & ~mask).sum()),
      "pixels": int(truth.size),
      "tile_scores": metrics.precision_per_image(t_tiles, p_tiles),
  }


def scores_of(counts: Sequence[dict]) -> dict:
  """The scores (`truth_scores`) of lines taken together, from their `truth_counts`."""
  tp, fp, fn = (sum(c[k] for c in counts) for k in ("tp", "fp", "fn"))
  pixels = sum(c["pixels"] for c in counts)
  tiles = np.concatenate([c["tile_scores"] for c in counts])
  return {
      "iou": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
      "precision": tp / (tp + fp) if tp + fp else None,
      "recall": tp / (tp + fn) if tp + fn else None,
      "competition_score": float(tiles.mean()),
      "tiles": int(len(tiles)),
      "true_salt_fraction": (tp + fn) / pixels,
      "predicted_salt_fraction": (tp + fp) / pixels,
  }


def truth_scores(truth: np.ndarray, mask: np.ndarray) -> dict:
  """How a line's mask compares with its known salt mask.

  iou: |salt in both| / |salt in either| (1 when both are empty);
  precision / recall: of salt pixels (None when nothing was predicted /
  nothing is salt); competition_score: the competition metric (`metrics`) averaged over
  the line's 101x101 tiles, side by side, the last of each row and column
  flush with the section's edge (`tiling.tile_starts(length, 101)`).
  """
  return scores_of([truth_counts(truth, mask)])


def log_scores(where: str, scores: dict) -> None:
  """Logs `scores_of`'s scores of the line(s) `where` names."""

  def fmt(x):
    return "n/a" if x is None else f"{x:.3f}"

  logging.info(
      "%s against the known mask: IoU %.3f, precision %s, recall %s, competition score %.3f"
      " over %d tiles",
      where,
      scores["iou"],
      fmt(scores["precision"]),
      fmt(scores["recall"]),
      scores["competition_score"],
      scores["tiles"],
  )

"""The gray levels of the training images, recorded in the workdir.

A model learns the contrast of the tiles it was trained on: how far gray
levels stray from a tile's middle gray, and how sharply they change from one
sample to the next down a trace.  Training records both distributions in
<workdir>/gray_levels.json; `configs/segment.py` then maps a section's
amplitudes so that its gray levels match them (`sections.match_training_clip`).

Both statistics are taken about each tile's own median gray (its zero
amplitude), leaving out blank (one-gray) tiles, so tiles whose gray levels
were stretched or shifted per tile (as the competition's were) are measured
by their contrast, not their offset.
"""

from __future__ import annotations

import datetime
import logging
import pathlib

import jax
import numpy as np

from saltjax import workdir as workdir_lib

VERSION = 1
# Percentiles recorded for each distribution.
PERCENTILES = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99)
# At most this many tiles (evenly strided) are measured.
_MAX_TILES = 4000


def gray_level_stats(images: np.ndarray) -> dict:
  """Percentiles of |gray - tile median| and |vertical gray step| of uint8 tiles.

  images: (N, H, W) gray tiles (N >= 1, H >= 2).
  """
  images = np.asarray(images)
  if images.ndim != 3 or len(images) == 0 or images.shape[1] < 2:
    raise ValueError(f"expected (N >= 1, H >= 2, W) gray images, got shape {images.shape}")
  step = max(1, len(images) // _MAX_TILES)
  tiles = images[::step].astype(np.float32)
  # Blank tiles (a few of the competition's are one flat gray) show no contrast to learn.
  varied = tiles.reshape(len(tiles), -1).std(axis=1) > 0
  tiles = tiles[varied] if varied.any() else tiles
  median = np.median(tiles.reshape(len(tiles), -1), axis=1)[:, None, None]
  deviation = np.abs(tiles - median)
  contrast = np.abs(np.diff(tiles, axis=1))
  spread = tiles.reshape(len(tiles), -1).std(axis=1)
  return {
      "version": VERSION,
      "images": int(len(tiles)),
      "percentiles": list(PERCENTILES),
      "deviation": _rounded(np.percentile(deviation, PERCENTILES)),
      "contrast": _rounded(np.percentile(contrast, PERCENTILES)),
      "tile_std": _rounded(np.percentile(spread, PERCENTILES)),
      "mean_gray": round(float(tiles.mean()), 3),
      "definitions": {
          "deviation": "|gray - the tile's median gray|, every pixel of every tile",
          "contrast": "|gray[i+1, j] - gray[i, j]|: steps between vertical neighbours",
          "tile_std": "the standard deviation of each tile's gray levels",
      },
  }


def _rounded(values) -> list[float]:
  return [round(float(v), 3) for v in values]


def write(workdir: pathlib.Path, images: np.ndarray, source: str = "training") -> dict | None:
  """Writes <workdir>/gray_levels.json for the training images (process 0 only)."""
  if jax.process_index() != 0 or len(images) == 0:
    return None
  stats = gray_level_stats(images)
  stats["computed"] = {
      "from": source,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  path = workdir_lib.gray_levels_path(workdir)
  workdir_lib.write_json(stats, path)
  logging.info(
      "Training gray levels: median |gray - tile median| %.1f, median vertical step %.1f (%s)",
      stats["deviation"][PERCENTILES.index(50)],
      stats["contrast"][PERCENTILES.index(50)],
      path,
  )
  return stats


def read(workdir: pathlib.Path) -> dict | None:
  """The recorded statistics, or None when the workdir has none (or unreadable ones)."""
  import json

  path = workdir_lib.gray_levels_path(workdir)
  if not path.is_file():
    return None
  try:
    stats = json.loads(path.read_text())
    ok = (
        list(stats["percentiles"]) == list(PERCENTILES)
        and len(stats["deviation"]) == len(PERCENTILES)
        and len(stats["contrast"]) == len(PERCENTILES)
    )
  except (OSError, ValueError, KeyError, TypeError):
    ok = False
  if not ok:
    logging.warning("%s is unreadable or of another version: ignored", path)
    return None
  return stats

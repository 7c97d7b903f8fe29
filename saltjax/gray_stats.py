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

A model also learns the size of things in pixels.  The third statistic is
the tiles' vertical period (`vertical_period`): the lag at which the
autocorrelation down the traces first crosses zero, a quarter of the
wavelet's period or so.  It depends neither on the amplitude scale nor on
white noise (which only adds to lag 0), so a section whose period lies
outside the tiles' range was sampled more finely or coarsely than the tiles,
and `segment` resamples it (`sections.choose_scale`).
"""

from __future__ import annotations

import datetime
import logging
import pathlib

import jax
import numpy as np

from saltjax import workdir as workdir_lib

VERSION = 2  # 2: vertical_period added
# Percentiles recorded for each distribution.
PERCENTILES = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99)
# At most this many tiles (evenly strided) are measured.
_MAX_TILES = 4000
# Traces transformed together by vertical_autocorrelation.
_TRACES_AT_ONCE = 256


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
  periods = np.array([vertical_period(tile) for tile in tiles])
  periods = periods[np.isfinite(periods)]
  return {
      "version": VERSION,
      "images": int(len(tiles)),
      "percentiles": list(PERCENTILES),
      "deviation": _rounded(np.percentile(deviation, PERCENTILES)),
      "contrast": _rounded(np.percentile(contrast, PERCENTILES)),
      "tile_std": _rounded(np.percentile(spread, PERCENTILES)),
      "vertical_period": _rounded(np.percentile(periods, PERCENTILES)) if len(periods) else None,
      "mean_gray": round(float(tiles.mean()), 3),
      "definitions": {
          "deviation": "|gray - the tile's median gray|, every pixel of every tile",
          "contrast": "|gray[i+1, j] - gray[i, j]|: steps between vertical neighbours",
          "tile_std": "the standard deviation of each tile's gray levels",
          "vertical_period": "pixels: the first zero of each tile's autocorrelation down"
          " its traces (gray_stats.vertical_period)",
      },
  }


def vertical_autocorrelation(section: np.ndarray, max_traces: int = 2000) -> np.ndarray:
  """Autocorrelation down the traces of a (samples, traces) array, summed over traces.

  Each trace's mean is taken out first (a picture's middle gray, a DC
  offset); at most `max_traces` evenly strided traces are used, a few hundred
  at a time (memory stays bounded for long traces).  Returns the lags
  0 .. samples - 1, unnormalised (lag 0 holds the total energy).
  """
  section = np.asarray(section)
  step = -(-section.shape[1] // max(1, max_traces))
  n = section.shape[0]
  total = np.zeros(n)
  for start in range(0, section.shape[1], step * _TRACES_AT_ONCE):
    traces = section[:, start : start + step * _TRACES_AT_ONCE : step].astype(np.float64)
    traces -= traces.mean(axis=0, keepdims=True)
    spectrum = np.fft.rfft(traces, 2 * n, axis=0)  # zero-padded: no wrap-around
    total += np.fft.irfft(np.abs(spectrum) ** 2, 2 * n, axis=0)[:n].sum(axis=1)
  return total


def first_zero(autocorrelation: np.ndarray) -> float:
  """The first lag (linearly interpolated, in samples) where an autocorrelation
  reaches 0; NaN when it has no energy or never gets there in the first half."""
  ac = np.asarray(autocorrelation, np.float64)
  half = ac[: max(2, len(ac) // 2)]
  if not half[0] > 0:
    return float("nan")
  crossed = np.flatnonzero(half <= 0)
  if not len(crossed):
    return float("nan")
  i = int(crossed[0])
  return float(i - 1 + half[i - 1] / (half[i - 1] - half[i]))


def vertical_period(section: np.ndarray) -> float:
  """Pixels: the first zero of a (samples, traces) array's autocorrelation down its traces."""
  return first_zero(vertical_autocorrelation(section))


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
        # Added later: an older file without it is measured again from the training data.
        and "vertical_period" in stats
    )
  except (OSError, ValueError, KeyError, TypeError):
    ok = False
  if not ok:
    logging.warning("%s is unreadable or of another version: ignored", path)
    return None
  return stats

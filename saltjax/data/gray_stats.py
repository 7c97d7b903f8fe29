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
import warnings

import jax
import numpy as np

from saltjax import workdir as workdir_lib

VERSION = 2  # 2: vertical_period added
# Percentiles recorded for each distribution.
PERCENTILES = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99)
# At most this many tiles (evenly strided) are measured.
_MAX_TILES = 4000
_MAX_PERIOD_TILES = 1000
# Traces transformed together by vertical_autocorrelation.
_TRACES_AT_ONCE = 256
# Samples in a run of at least this many equal values down a trace are not
# data (a muted zone, a flat band drawn along a picture's edge): the vertical
# period leaves them out.  A band of 3 black rows on an 8-bit picture moves the
# period by 30 % if kept; leaving out runs of 3 moves the period of a picture
# drawn at 8 grays per unit (many equal neighbours) by 1 % and of the tiles
# by less than 0.1 %.
FLAT_RUN = 3
# vertical_autocorrelation clips samples at this many times the median |sample|
# (|a| of seismic is about exponential: 4.6x its median is its 99th percentile).
_CLIP_RATIO = 6.0


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
  # The periods of at most _MAX_PERIOD_TILES tiles (about 2 ms each): their
  # percentiles are as good, and training starts sooner.
  periods = np.array(
      [vertical_period(tile) for tile in tiles[:: -(-len(tiles) // _MAX_PERIOD_TILES)]]
  )
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

  Runs of FLAT_RUN or more identical samples down a trace (a muted zone, a
  band of one gray drawn above or below a picture) are left out: such a
  block's step to the data would otherwise add a long, slow lobe.  The rest
  is clipped at _CLIP_RATIO x its median |sample| about each trace's median
  (a spike or one very strong reflector would otherwise set the result
  alone), and each trace's mean is taken out (a picture's middle gray, a DC
  offset).  At most `max_traces` evenly strided traces are used, a few
  hundred at a time (memory stays bounded for long traces).  Returns the lags
  0 .. samples - 1, unnormalised (lag 0 holds the total energy).
  """
  section = np.asarray(section)
  step = -(-section.shape[1] // max(1, max_traces))
  n = section.shape[0]
  total = np.zeros(n)
  for start in range(0, section.shape[1], step * _TRACES_AT_ONCE):
    traces = section[:, start : start + step * _TRACES_AT_ONCE : step].astype(np.float64)
    live = ~_in_flat_runs(traces)
    if not live.any():
      continue
    # About each trace's median: a few samples far above the rest (a spike, one
    # very strong reflector) would set the autocorrelation alone, so samples are
    # clipped at _CLIP_RATIO x the median |sample| (all but the largest ~1 % of
    # seismic amplitudes stay as they are); then each trace's mean is taken out.
    with warnings.catch_warnings():  # a trace with no live sample has no median
      warnings.simplefilter("ignore", RuntimeWarning)
      center = np.nanmedian(np.where(live, traces, np.nan), axis=0, keepdims=True)
    traces = np.nan_to_num(traces - center)  # such traces are zeroed below
    limit = _CLIP_RATIO * np.median(np.abs(traces[live]))
    if limit > 0:
      np.clip(traces, -limit, limit, out=traces)
    count = np.maximum(live.sum(axis=0, keepdims=True), 1)
    mean = np.where(live, traces, 0.0).sum(axis=0, keepdims=True) / count
    traces = np.where(live, traces - mean, 0.0)
    spectrum = np.fft.rfft(traces, 2 * n, axis=0)  # zero-padded: no wrap-around
    total += np.fft.irfft(np.abs(spectrum) ** 2, 2 * n, axis=0)[:n].sum(axis=1)
  return total


def _in_flat_runs(traces: np.ndarray) -> np.ndarray:
  """Whether each sample lies in a run of FLAT_RUN or more equal samples down its trace."""
  n = traces.shape[0]
  if n < FLAT_RUN:
    return np.zeros(traces.shape, bool)
  same = np.zeros((n + 1,) + traces.shape[1:], np.int32)
  np.cumsum(traces[1:] == traces[:-1], axis=0, out=same[2:])
  # Runs of FLAT_RUN - 1 equal neighbour pairs start at samples i = 0 .. n - FLAT_RUN.
  starts = (same[FLAT_RUN:] - same[1 : n - FLAT_RUN + 2]) == FLAT_RUN - 1
  # Mark the FLAT_RUN samples of every such run.
  marks = np.zeros((n + 1,) + traces.shape[1:], np.int32)
  marks[:-FLAT_RUN] += starts
  marks[FLAT_RUN:] -= starts
  return np.cumsum(marks, axis=0)[:n] > 0


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

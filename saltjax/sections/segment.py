"""Segmenting whole seismic sections with a trained workdir's ensemble.

python main.py --config=configs/segment.py --workdir=runs/fold \\
    --config.segment.input=line.sgy

The competition's 101x101 tiles were cut from seismic sections; this module
runs the workdir's model on sections of any size, the way an interpreter
would use it:

1. Read the input: a SEG-Y 2-D line or 3-D volume (every inline, or the
   inlines or crosslines asked for), a .npy array, or a PNG.  Sections are
   (samples, traces): depth down the rows, traces along the columns.
2. Map amplitudes to the model's 8-bit range (`amplitude_to_gray`): gray =
   127.5 + 127.5 * clip(a / c, -1, 1), rounded.  The clip level c is chosen
   by `segment.amplitude`: 'match_training' (the default) fits c so that the
   section's gray levels match those of the tiles the model was trained on
   (<workdir>/gray_levels.json, `match_training_clip`); 'percentile' takes
   the `clip_percentile`-th percentile of |a|; 'value' takes `clip_value`.
   One c serves every selected line.  Unsigned inputs (8- and 16-bit PNGs,
   uint8 and uint16 arrays), and any input that is never negative, are
   pictures of amplitudes drawn around some middle level at some contrast,
   neither of which need be the training tiles': their amplitude is a =
   value - (their median value), mapped by the same rules; 'as_is' gives an
   8-bit picture to the model unchanged.
3. Resample the gray section by `scale_samples` x `scale_traces`, so that its
   features are the size the model learned them at (`choose_scale`): by
   default (-1) the factor down the traces is estimated from the section's
   vertical period against the training tiles' (a section sampled twice as
   finely has twice the period), and the factor along the line follows it;
   cut overlapping 101x101 tiles (`stride` apart; the last tile of a row or
   column is aligned with the section's edge), predict every tile with the
   fold x snapshot ensemble and TTA (as `configs/predict.py` does), and
   blend the tile probabilities with a smooth window that falls to almost 0
   at a tile's border, so no seam shows (`blend_tiles`); resample the blended
   probability back to the section's own size.
4. Binarise the blended probability at the threshold tuned on the
   out-of-fold predictions (scores.json) and remove salt regions smaller
   than the tuned minimum area (on a tile that rule empties small masks; on
   a section it removes small connected regions).
5. With `segment.truth` (a known mask), score the mask against it: IoU,
   precision and recall of salt pixels, and the competition score over the
   section's 101x101 tiles, per line and overall (`truth_scores`).
6. Write the outputs under <workdir>/sections/, each file under a temporary
   name first and all renamed into place at the end: nothing is written
   when the input is bad.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np

from saltjax.app import config_checks
from saltjax.data import gray_stats
from saltjax import metrics
from saltjax.sections import segy
from saltjax import workdir as workdir_lib
from saltjax.data.layout import DataError

TILE = 101
SECTIONS_DIR = "sections"
# At most this many |amplitude| values (evenly strided) set the clip level.
_CLIP_SAMPLE = 4_000_000
# Tiles predicted together; several small lines share one chunk.
_CHUNK_TILES = 2048
_SEGY_SUFFIXES = (".sgy", ".segy")
# segment.amplitude: how the clip level is chosen.
AMPLITUDE_RULES = ("match_training", "percentile", "value", "as_is")
DEFAULT_CLIP_PERCENTILE = 99.0
# segment.scale_samples / scale_traces: the resampling factors allowed.
MAX_SCALE = 8.0
# segment.scale_samples=-1: a section whose vertical period lies within the
# training tiles' percentiles 20-80 is left at its sampling (the model has
# seen many such tiles); outside, it is resampled so that its period lands on
# the nearer of the two.  The factor is continuous in the period: two
# renderings of one section measured a hair apart get almost the same factor.
_SCALE_RANGE = (20, 80)
# An estimated factor beyond this (either way) is not trusted: a period so far
# from the tiles' is a trend or a picture that is not a comparable section.
_MAX_ESTIMATED_SCALE = 4.0
# The percentiles of |gray - middle gray| that a section is fitted to: the upper
# half, set by the layered sediments (the lower half is mostly the weak inside
# of salt, whose share varies from section to section, and noise), below the
# strongest 10% of samples (a few strong reflectors do not move them).
MATCH_PERCENTILES = (50, 60, 70, 80, 90)
# Samples with |a| above this many times the median |a| are not fitted (in the
# training tiles |gray - median| reaches about 11x its median at the 99th
# percentile, and a Laplace distribution passes 20x once in a million).
_OUTLIER_RATIO = 20.0
# Vertical pairs of samples (drawn with a fixed seed) that the fit measures.
_MATCH_SAMPLE = 100_000
# At most this many traces (evenly strided over every line) measure the vertical period.
_PERIOD_TRACES = 2000
# Candidate gains around the first estimate: 2**-3 to 2**3 in steps of 7%,
# then around the best of those in steps of 0.35%.
_MATCH_COARSE = 2.0 ** np.linspace(-3.0, 3.0, 61)
_MATCH_FINE = 2.0 ** np.linspace(-0.1, 0.1, 21)


# --------------------------------------------------------------- amplitudes ---


def clip_level(amplitudes: np.ndarray, percentile: float) -> float:
  """The amplitude mapped to full gray: a percentile of |amplitude|."""
  return float(np.percentile(np.abs(amplitudes), percentile))


def amplitude_to_gray(amplitude: np.ndarray, clip: float, zero: float = 0.0) -> np.ndarray:
  """uint8 gray: 0 at zero - clip and below, 255 at zero + clip and above, 127.5 at zero."""
  scaled = np.clip((np.asarray(amplitude, np.float64) - zero) / clip, -1.0, 1.0)
  return np.rint(127.5 + 127.5 * scaled).astype(np.uint8)


def _gray_levels(values: np.ndarray, below: np.ndarray, gain: float) -> tuple:
  """|gray - 128| and |vertical gray step| of amplitude pairs mapped at `gain` grays/unit."""
  top = np.rint(127.5 + np.clip(gain * values, -127.5, 127.5))
  bottom = np.rint(127.5 + np.clip(gain * below, -127.5, 127.5))
  return np.abs(top - 128.0), np.abs(bottom - top)


def match_training_clip(values: np.ndarray, below: np.ndarray, stats: dict) -> tuple[float, dict]:
  """The clip level whose gray levels best match the training images' (gray_stats).

  values, below: amplitudes a[i, j] and a[i + 1, j] of vertical neighbours
  drawn from the section(s).  For every candidate clip level the samples are
  mapped to gray exactly as the section will be (clipping and rounding
  included); the chosen level minimises the mean |log(1 + q_section) -
  log(1 + q_training)| over MATCH_PERCENTILES of |gray - 128|, the distance
  from the middle gray that zero amplitude maps to (the training tiles':
  from each tile's median gray).  Quantiles move with the amplitudes' scale,
  so the mapped gray levels do not depend on it; samples over 20x the median
  |a| are left out and the 50th-90th percentiles fitted, so the strongest
  reflectors do not set it.  The local contrast down a trace, |gray[i + 1]
  - gray[i]|, is reported beside the training images' (how far the
  section's texture differs from theirs) but not fitted: in trials on
  sections rendered with other noise levels and wavelets, fitting it too
  gave slightly worse masks.

  Returns (clip level, a report of the fit for <stem>_segment.json).
  """
  values = np.asarray(values, np.float64)
  below = np.asarray(below, np.float64)
  # Samples far brighter than the typical one (a reflector many times the
  # sediments', a spike) are left out: they would otherwise push every
  # percentile of the rest up by their share of the samples.
  typical = np.median(np.abs(values))
  if typical > 0:
    ordinary = np.maximum(np.abs(values), np.abs(below)) <= _OUTLIER_RATIO * typical
    values, below = values[ordinary], below[ordinary]
  fit = np.array(MATCH_PERCENTILES, float)
  recorded = np.array(stats["percentiles"], float)
  want_dev = np.interp(fit, recorded, stats["deviation"])
  want_con = np.interp(fit, recorded, stats["contrast"])
  have_dev = np.percentile(np.abs(values), fit)
  # First estimate: the typical ratio of wanted to present quantiles.
  usable = (have_dev > 0) & (want_dev > 0)
  if not usable.any():
    raise ValueError("the amplitudes are (almost) all zero")
  first = float(np.exp(np.median(np.log(want_dev[usable] / have_dev[usable]))))
  target = np.log1p(want_dev)

  def loss(gain):
    dev = np.percentile(_gray_levels(values, below, gain)[0], fit)
    return float(np.abs(np.log1p(dev) - target).mean())

  def best_of(gains):
    losses = [loss(g) for g in gains]
    # Ties (rounding makes the loss piecewise constant): the middle of the best run.
    best = np.flatnonzero(np.isclose(losses, min(losses), rtol=0, atol=1e-12))
    return float(gains[best[len(best) // 2]])

  gain = best_of(first * _MATCH_COARSE)
  gain = best_of(gain * _MATCH_FINE)
  dev, con = _gray_levels(values, below, gain)
  report = {
      "percentiles": list(MATCH_PERCENTILES),
      "deviation": {
          "section": _rounded(np.percentile(dev, fit)),
          "training": _rounded(want_dev),
      },
      "contrast": {
          "section": _rounded(np.percentile(con, fit)),
          "training": _rounded(want_con),
      },
      "mean_abs_log_ratio": round(loss(gain), 4),
  }
  return 127.5 / gain, report


def _rounded(values) -> list[float]:
  return [round(float(v), 2) for v in values]


# ------------------------------------------------------------ tile and blend ---


def tile_starts(length: int, stride: int, tile: int = TILE) -> np.ndarray:
  """Tile origins along one axis: every `stride`, the last flush with the end."""
  if length < tile:
    raise ValueError(f"a section of {length} samples is shorter than a tile ({tile})")
  starts = list(range(0, length - tile + 1, stride))
  if starts[-1] != length - tile:
    starts.append(length - tile)
  return np.array(starts, np.int64)


def tile_window(tile: int = TILE) -> np.ndarray:
  """(tile, tile) blending weights: a product of sin^2 tapers, > 0 everywhere.

  The weight is about 1 in the tile's middle and about 2e-4 on its border, so
  a tile's prediction fades out before its edge (where a CNN sees least
  context) and the neighbouring tiles, whose middles cover that place, take
  over continuously.  It never reaches 0, so pixels that only one tile covers
  (at the section's edges) keep that tile's value exactly.
  """
  taper = np.sin(np.pi * (np.arange(tile) + 0.5) / tile) ** 2
  return np.outer(taper, taper)


def cut_tiles(section: np.ndarray, stride: int, tile: int = TILE) -> tuple[np.ndarray, np.ndarray]:
  """Overlapping tiles of a (rows, cols) section: (N, tile, tile) and origins (N, 2)."""
  rows, cols = tile_starts(section.shape[0], stride, tile), tile_starts(
      section.shape[1], stride, tile
  )
  origins = np.array([(r, c) for r in rows for c in cols], np.int64)
  tiles = np.stack([section[r : r + tile, c : c + tile] for r, c in origins])
  return tiles, origins


def blend_tiles(
    tile_probs: np.ndarray, origins: np.ndarray, shape: tuple[int, int], window: np.ndarray | None
) -> np.ndarray:
  """The weighted mean of overlapping tile predictions at every pixel.

  window=None weights every pixel of every tile equally (a plain average).
  """
  tile = tile_probs.shape[-1]
  weight = np.ones((tile, tile)) if window is None else window
  total = np.zeros(shape, np.float64)
  norm = np.zeros(shape, np.float64)
  for p, (r, c) in zip(tile_probs, origins):
    total[r : r + tile, c : c + tile] += weight * p
    norm[r : r + tile, c : c + tile] += weight
  return (total / norm).astype(np.float32)


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
  """Drops 8-connected salt regions of fewer than `min_area` pixels."""
  mask = np.asarray(mask, bool)
  if min_area <= 1 or not mask.any():
    return mask
  count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
  keep = stats[:, cv2.CC_STAT_AREA] >= min_area
  keep[0] = False  # background
  return keep[labels]


def segment_sections(
    gray_sections: Sequence[np.ndarray],
    predict_tiles: Callable,
    stride: int,
    window: np.ndarray | None = None,
) -> list[np.ndarray]:
  """Blended salt probabilities of uint8 (rows, cols) sections, predicted together.

  predict_tiles: uint8 (N, 101, 101) tiles -> float (N, 101, 101) probabilities.
  """
  window = tile_window() if window is None else window
  cut = [cut_tiles(g, stride) for g in gray_sections]
  probs = predict_tiles(np.concatenate([tiles for tiles, _ in cut]))
  out, start = [], 0
  for g, (tiles, origins) in zip(gray_sections, cut):
    out.append(blend_tiles(probs[start : start + len(tiles)], origins, g.shape, window))
    start += len(tiles)
  return out


def model_shape(shape: tuple[int, int], segment) -> tuple[int, int]:
  """(samples, traces) of a section once resampled by segment.scale_samples / scale_traces."""
  if not (segment.scale_samples > 0 and segment.scale_traces > 0):
    raise ValueError("the scale factors are not chosen yet: see sections.choose_scale")
  return (
      max(1, round(shape[0] * segment.scale_samples)),
      max(1, round(shape[1] * segment.scale_traces)),
  )


def resample(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """`image` at (rows, cols) = `shape`: area averaging to shrink, bilinear to enlarge."""
  if image.shape == tuple(shape):
    return image
  shrinking = shape[0] * shape[1] < image.shape[0] * image.shape[1]
  method = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
  return cv2.resize(image, (shape[1], shape[0]), interpolation=method)


def section_min_area(min_area: int, segment) -> int:
  """A minimum area in the model's pixels, in the section's (a section pixel is
  scale_samples x scale_traces model pixels)."""
  return round(min_area / (segment.scale_samples * segment.scale_traces))


def probabilities_and_masks(
    grays: Sequence[np.ndarray], ensemble: "Ensemble", segment, window: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
  """(salt probability, mask) of gray sections of one shape, as `segment` makes them.

  Each is resampled to the model's sampling (segment.scale_samples /
  scale_traces), tiled every segment.stride pixels, predicted together and
  blended; the probability is resampled back to the section's size and
  thresholded, and salt regions under the minimum area removed.
  """
  shape = grays[0].shape
  resampled = model_shape(shape, segment)
  probs = segment_sections(
      [resample(g, resampled) for g in grays], ensemble.predict_tiles, segment.stride, window
  )
  min_area = section_min_area(ensemble.min_area, segment)
  out = []
  for prob in probs:
    prob = resample(prob, shape)
    out.append((prob, remove_small_regions(prob > ensemble.threshold, min_area)))
  return out


# ------------------------------------------------------------------- config ---


def parse_line_numbers(text: str, key: str) -> list[int] | None:
  """'100,102,110-120' -> [100, 102, 110, ..., 120]; '' -> None (every line)."""
  text = str(text).strip()
  if not text:
    return None
  numbers = []
  try:
    for part in text.split(","):
      part = part.strip()
      if "-" in part:  # a range; line numbers are not negative
        first, last = (int(n) for n in part.split("-", 1))
        if last < first:
          raise ValueError(part)
        numbers += range(first, last + 1)
      else:
        numbers.append(int(part))
  except ValueError:
    raise config_checks.ConfigError(
        f"config.segment.{key}={text!r}: use line numbers and ranges such as" " '100,102,110-120'"
    ) from None
  return list(dict.fromkeys(numbers))


def check_config(config) -> None:
  """The `segment` section's values; every problem at once, naming its key."""
  s = config.segment
  problems = []

  def need(ok, key, message):
    if not ok:
      problems.append(f"config.segment.{key}={s[key]!r}: {message}")

  need(bool(s.input), "input", "give the SEG-Y, .npy or PNG file to segment")
  need(not s.input or pathlib.Path(s.input).expanduser().is_file(), "input", "no such file")
  need(
      isinstance(s.stride, int) and 1 <= s.stride <= TILE,
      "stride",
      f"must be an integer from 1 to {TILE} (a larger stride would leave gaps)",
  )
  need(
      s.amplitude in AMPLITUDE_RULES,
      "amplitude",
      "use " + ", ".join(repr(r) for r in AMPLITUDE_RULES),
  )
  need(0 < s.clip_percentile <= 100, "clip_percentile", "must be in (0, 100]")
  for key, auto in (
      ("scale_samples", "estimated from the section"),
      ("scale_traces", "the factor scale_samples comes to"),
  ):
    need(
        isinstance(s[key], (int, float)) and (0 < s[key] <= MAX_SCALE or s[key] == -1),
        key,
        f"must be a factor in (0, {MAX_SCALE:g}] (1: the section's own sampling), or -1"
        f" ({auto})",
    )
  need(s.clip_value >= 0, "clip_value", "must be >= 0")
  need(
      s.amplitude != "value" or s.clip_value > 0,
      "clip_value",
      "config.segment.amplitude='value' needs the clip level: an amplitude > 0",
  )
  need(
      s.amplitude == "value" or s.clip_value == 0,
      "clip_value",
      f"is used only with config.segment.amplitude='value' (now {s.amplitude!r})",
  )
  need(
      s.amplitude == "percentile" or s.clip_percentile == DEFAULT_CLIP_PERCENTILE,
      "clip_percentile",
      f"is used only with config.segment.amplitude='percentile' (now {s.amplitude!r})",
  )
  need(
      not s.truth or pathlib.Path(s.truth).expanduser().is_file(),
      "truth",
      "no such file (the known salt mask: .npy, .npz or PNG)",
  )
  need(
      s.threshold < 0 or 0 < s.threshold < 1,
      "threshold",
      "must be in (0, 1), or -1 for the threshold tuned in scores.json",
  )
  need(
      isinstance(s.min_area, int) and s.min_area >= -1,
      "min_area",
      "must be >= 0, or -1 for the minimum area tuned in scores.json",
  )
  need(
      not (str(s.inlines).strip() and str(s.crosslines).strip()),
      "crosslines",
      "segment inlines or crosslines in one run, not both",
  )
  if problems:
    raise config_checks.ConfigError("bad config:\n  " + "\n  ".join(problems))
  parse_line_numbers(s.inlines, "inlines")
  parse_line_numbers(s.crosslines, "crosslines")


# ------------------------------------------------------------------- inputs ---


@dataclasses.dataclass
class Section:
  """One section of the input: its name and how to read it."""

  name: str  # "line", "inline 105", "crossline 7"
  label: str  # the part of an output file name: "" for a 2-D input, "inline105"
  read: Callable[[], np.ndarray]  # -> (samples, traces)
  traces: np.ndarray | None = None  # SEG-Y trace indices, left to right


@dataclasses.dataclass
class SectionInput:
  path: pathlib.Path
  kind: str  # "segy", "npy", "png"
  sections: list[Section]
  is_volume: bool
  is_gray: bool  # 8-bit: the model's own range ('as_is' may use it unchanged)
  direction: str
  segy_file: segy.SegyFile | None = None
  # Unsigned values (PNGs, uint arrays): a picture whose zero amplitude is its median.
  is_picture: bool = False

  def close(self):
    if self.segy_file is not None:
      self.segy_file.close()


def _select(direction: str, numbers: list[int] | None, available: int, path) -> list[int]:
  if numbers is None:
    return list(range(available))
  missing = [n for n in numbers if not 0 <= n < available]
  if missing:
    raise DataError(
        f"{path}: has no {direction}(s) {', '.join(map(str, missing[:10]))};"
        f" its {direction}s are numbered 0 to {available - 1} (array index)"
    )
  return numbers


def open_input(
    path: str | os.PathLike, inlines: list[int] | None = None, crosslines: list[int] | None = None
) -> SectionInput:
  """Opens a SEG-Y file, .npy array or PNG as a list of sections."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise DataError(f"{path}: no such file")
  direction = segy.CROSSLINE if crosslines is not None else segy.INLINE
  numbers = crosslines if crosslines is not None else inlines
  suffix = path.suffix.lower()
  if suffix == ".npy":
    return _open_npy(path, direction, numbers)
  if suffix == ".png":
    return _open_png(path, direction, numbers)
  # Anything else is taken for SEG-Y; segyio says if it is not.
  source = segy.SegyFile(path)
  try:
    lines = source.lines(direction, numbers)
  except BaseException:
    source.close()
    raise
  sections = [
      Section(
          line.name,
          "" if not source.is_volume else line.name.replace(" ", ""),
          (lambda line=line: source.read(line)),
          line.traces,
      )
      for line in lines
  ]
  return SectionInput(path, "segy", sections, source.is_volume, False, direction, source)


def in_memory_input(
    sections: np.ndarray | Sequence[np.ndarray], name: str = "section.npy"
) -> SectionInput:
  """A 2-D section held in memory, or a list of lines of one type, as `segment`
  sees an .npy file of them (uint8: an 8-bit picture)."""
  if isinstance(sections, np.ndarray):
    lines = [("line", "", sections)]
  else:
    lines = [(f"inline {k}", f"inline{k}", np.asarray(a)) for k, a in enumerate(sections)]
  dtype = lines[0][2].dtype
  return SectionInput(
      pathlib.Path(name),
      "npy",
      [Section(line, label, lambda a=a: a) for line, label, a in lines],
      is_volume=len(lines) > 1,
      is_gray=dtype == np.uint8,
      direction=segy.INLINE,
      is_picture=np.issubdtype(dtype, np.unsignedinteger),
  )


def _open_npy(path: pathlib.Path, direction: str, numbers) -> SectionInput:
  try:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise DataError(f"{path}: not a readable .npy array ({e})") from e
  if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
    raise DataError(f"{path}: holds {array.dtype} values; expected real numbers")
  if array.ndim == 2:
    if numbers is not None:
      raise DataError(
          f"{path}: is one 2-D section, so config.segment.{direction}s" " cannot select lines in it"
      )
    sections = [Section("line", "", lambda: np.asarray(array))]
  elif array.ndim == 3:
    # (lines, samples, traces): inline k is array[k]; crossline j is the j-th
    # trace of every inline.
    if direction == segy.INLINE:
      chosen = _select(direction, numbers, array.shape[0], path)
      sections = [
          Section(f"inline {k}", f"inline{k}", lambda k=k: np.asarray(array[k])) for k in chosen
      ]
    else:
      chosen = _select(direction, numbers, array.shape[2], path)
      sections = [
          Section(f"crossline {k}", f"crossline{k}", lambda k=k: np.asarray(array[:, :, k]).T)
          for k in chosen
      ]
  else:
    raise DataError(
        f"{path}: has shape {array.shape}; expected a section (samples, traces)"
        " or a volume (lines, samples, traces)"
    )
  picture = np.issubdtype(array.dtype, np.unsignedinteger)
  return SectionInput(
      path, "npy", sections, array.ndim == 3, array.dtype == np.uint8, direction, is_picture=picture
  )


def _open_png(path: pathlib.Path, direction: str, numbers) -> SectionInput:
  if numbers is not None:
    raise DataError(
        f"{path}: a PNG is one 2-D section, so config.segment.{direction}s"
        " cannot select lines in it"
    )
  image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
  if image is None:
    raise DataError(f"{path}: not a readable PNG image (unreadable or truncated)")
  if image.ndim == 3 and image.shape[2] in (3, 4):
    color = image[:, :, :3]
    if not (
        np.array_equal(color[..., 0], color[..., 1])
        and np.array_equal(color[..., 0], color[..., 2])
    ):
      raise DataError(f"{path}: is a color image; expected a gray section")
    image = color[..., 0]
  if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16):
    raise DataError(
        f"{path}: is not an 8- or 16-bit gray image ({image.dtype}," f" shape {image.shape})"
    )
  gray = image.dtype == np.uint8
  return SectionInput(
      path, "png", [Section("line", "", lambda: image)], False, gray, direction, is_picture=True
  )


def check_size(source: SectionInput, shape: tuple[int, int], segment) -> None:
  """A section (every line is `shape`) must hold a tile once resampled by segment's factors."""
  scaled = model_shape(shape, segment)
  if min(scaled) >= TILE:
    return
  resampled = (
      ""
      if scaled == tuple(shape)
      else f", {scaled[0]} x {scaled[1]} once resampled by config.segment.scale_samples"
      f" and scale_traces ({segment.scale_samples:g} x {segment.scale_traces:g})"
  )
  lines = "" if len(source.sections) == 1 else " (every line)"
  raise DataError(
      f"{source.path}: the section{lines} is {shape[0]} samples x {shape[1]}"
      f" traces{resampled}; it must be at least {TILE} x {TILE} (one tile) to be segmented"
  )


def _check_section(source: SectionInput, section: Section, values: np.ndarray) -> None:
  where = f"{source.path}" + ("" if section.name == "line" else f" ({section.name})")
  if min(values.shape) < 2:
    raise DataError(
        f"{where}: the section is {values.shape[0]} samples x {values.shape[1]} traces;"
        f" it must be at least {TILE} x {TILE} (one tile) to be segmented"
    )
  bad = ~np.isfinite(values)
  if bad.any():
    r, c = np.argwhere(bad)[0]
    raise DataError(
        f"{where}: {int(bad.sum())} sample(s) are NaN or infinite (the first at sample"
        f" {r}, trace {c}); fix or mute them before segmenting"
    )


@dataclasses.dataclass
class Scan:
  """What reading every section once found: their shape and amplitude samples."""

  shape: tuple[int, int]
  magnitudes: np.ndarray  # |a|, evenly strided (the percentile rule)
  pairs: tuple[np.ndarray, np.ndarray]  # a[i, j], a[i+1, j] (match_training)
  # The input value of zero amplitude: 0, or a picture's median value.
  zero: float = 0.0
  picture: bool = False  # a picture of amplitudes (SectionInput.is_picture, or never negative)
  # Every line's autocorrelation down the traces, summed (gray_stats.vertical_autocorrelation).
  autocorrelation: np.ndarray | None = None


def scan_input(source: SectionInput) -> Scan:
  """Checks every section (finite samples, one shape) and samples its amplitudes.

  Everything is read once here, before anything is written, so bad input
  fails without leaving outputs behind.  Whether the section holds a tile
  depends on the scale factors: `map_to_model` checks that once they are chosen.
  """
  samples, values, below, shape = [], [], [], None
  rng = np.random.default_rng(0)
  per_line = -(-_MATCH_SAMPLE // len(source.sections))
  autocorrelation = 0.0
  max_traces = max(1, _PERIOD_TRACES // len(source.sections))
  for section in source.sections:
    data = section.read()
    _check_section(source, section, data)
    shape = shape or data.shape
    if data.shape != shape:
      raise DataError(
          f"{source.path}: {section.name} is {data.shape[0]} x"
          f" {data.shape[1]}, unlike the first line's {shape[0]} x {shape[1]}"
      )
    step = max(1, data.size * len(source.sections) // _CLIP_SAMPLE)
    samples.append(np.asarray(data, np.float32).ravel()[::step])
    pair = _draw_pairs(data, rng, per_line)
    values.append(pair[0])
    below.append(pair[1])
    autocorrelation = autocorrelation + gray_stats.vertical_autocorrelation(data, max_traces)
  samples = np.concatenate(samples)
  # Seismic amplitudes have both signs: values that are never negative are a
  # picture of them, whatever their type (a PNG read into floats in [0, 1]).
  if not (source.is_picture or (samples.min() >= 0 and samples.max() > 0)):
    return Scan(shape, np.abs(samples), _live_pairs(values, below), autocorrelation=autocorrelation)
  # A picture is drawn around its zero amplitude, at whatever level its maker
  # chose: the median value (seismic amplitudes are symmetric about 0, and
  # salt's weak inside sits at 0 too).  Every sample is live: a value equal
  # to the median is a zero amplitude, not a dead trace.
  zero = float(np.median(samples))
  pairs = (np.concatenate(values) - zero, np.concatenate(below) - zero)
  return Scan(shape, np.abs(samples - zero), pairs, zero, True, autocorrelation)


def _draw_pairs(data: np.ndarray, rng: np.random.Generator, count: int) -> tuple:
  """`count` random vertical neighbours (a[i, j], a[i + 1, j]) of a section."""
  r = rng.integers(0, data.shape[0] - 1, count)
  c = rng.integers(0, data.shape[1], count)
  return np.asarray(data[r, c], np.float32), np.asarray(data[r + 1, c], np.float32)


def _live_pairs(values: list, below: list) -> tuple[np.ndarray, np.ndarray]:
  values, below = np.concatenate(values), np.concatenate(below)
  live = (values != 0) | (below != 0)  # dead traces and muted zones are left out
  return values[live], below[live]


def matched_clip(amplitudes: Sequence[np.ndarray], stats: dict) -> tuple[float, dict]:
  """The 'match_training' clip level of in-memory amplitude sections (signed, zero
  amplitude at 0), as `segment` finds it for a file of them."""
  return match_training_clip(*scan_input(in_memory_input(list(amplitudes))).pairs, stats)


def choose_clip(
    source: SectionInput, scan: Scan, segment, stats: dict | None, stats_note: str = ""
) -> tuple[float, dict]:
  """(clip level, the amplitude report for <stem>_segment.json) under segment.amplitude.

  stats: the training images' gray levels (gray_stats); None falls back from
  'match_training' to the percentile rule (stats_note says why).
  """
  rule = segment.amplitude
  if rule == "as_is":
    if not source.is_gray:
      raise DataError(
          f"{source.path}: is not 8-bit gray, so config.segment.amplitude='as_is'"
          " cannot give it to the model unchanged; choose 'match_training',"
          " 'percentile' or 'value'"
      )
    return 0.0, {"rule": rule, "description": "input is 8-bit gray: used unchanged"}
  report = {}
  if rule == "match_training" and stats is None:
    report["fallback"] = (
        f"{stats_note}; used the percentile rule instead (the"
        f" {segment.clip_percentile:g}th percentile of |a|)"
    )
    logging.warning("segment.amplitude='match_training': %s", report["fallback"])
    rule = "percentile"
  if rule == "value":
    clip = float(segment.clip_value)
    how = "config.segment.clip_value"
  elif rule == "percentile":
    clip = clip_level(scan.magnitudes, segment.clip_percentile) if len(scan.magnitudes) else 0.0
    how = f"the {segment.clip_percentile:g}th percentile of |a|"
  else:
    try:
      clip, report["match"] = match_training_clip(*scan.pairs, stats)
    except ValueError:
      clip = 0.0
    report["training_gray_levels"] = stats_note
    how = "fitted so that the gray levels match the training images'"
  if not clip > 0:
    raise DataError(
        f"{source.path}: the amplitudes are almost all 0, so no clip level can be found from"
        " them; set config.segment.amplitude='value' and config.segment.clip_value to the"
        " amplitude that should map to full gray"
    )
  if scan.picture:
    a = f"(v - {scan.zero:g})"
    report["zero"] = scan.zero
    how += f"; v is the input's value, {scan.zero:g} its median (zero amplitude)"
  else:
    a = "a"
  report = {
      "rule": rule,
      "clip_level": clip,
      "description": (
          f"gray = round(127.5 + 127.5 * clip({a} / {clip:.6g}, -1, 1)); clip level: {how}"
      ),
      **report,
  }
  return clip, report


def choose_scale(
    scan: Scan, segment, stats: dict | None, stats_note: str = ""
) -> tuple[tuple[float, float], dict]:
  """((scale_samples, scale_traces), the scale report for <stem>_segment.json).

  A factor of -1 is chosen here: scale_samples from the section's vertical
  period (gray_stats.vertical_period of every line together) against the
  training tiles' (stats["vertical_period"]): left at 1 within their
  percentiles 20-80, else the period is brought to the nearer of the two;
  scale_traces=-1 takes the factor scale_samples comes
  to (the section's aspect taken to be the tiles').  Without the tiles'
  periods, or a period of the section's, or when the factor would be beyond
  1/4-4, -1 falls back to 1 with a warning.
  """
  period = (
      gray_stats.first_zero(scan.autocorrelation)
      if scan.autocorrelation is not None
      else float("nan")
  )
  report = {"vertical_period": {"section": None if np.isnan(period) else round(period, 3)}}
  samples = float(segment.scale_samples)
  estimated = False
  if samples == -1:
    tiles = (stats or {}).get("vertical_period")
    if not tiles:
      why = f"{stats_note}; " if stats is None else "the training images have no vertical period; "
    elif np.isnan(period):
      why = "the section's autocorrelation down the traces has no zero (no oscillation); "
    else:
      why = ""
      at = dict(zip(gray_stats.PERCENTILES, tiles))
      target = [at[q] for q in _SCALE_RANGE]
      inside = target[0] <= period <= target[1]
      estimate = float(np.clip(period, *target)) / period
      if not 1 / _MAX_ESTIMATED_SCALE <= estimate <= _MAX_ESTIMATED_SCALE:
        why = (
            f"the section's vertical period, {period:.3g} pixels, is too far from the training"
            f" tiles' ({target[0]:.3g}-{target[1]:.3g}) to be a section sampled differently"
            f" (it would be resampled by {estimate:.3g}); "
        )
    if why:
      samples = 1.0
      report["fallback"] = (
          f"{why}left the section at its own sampling (scale_samples 1; give"
          " config.segment.scale_samples and scale_traces if it was sampled otherwise)"
      )
      logging.warning("segment.scale_samples=-1: %s", report["fallback"])
    else:
      samples, estimated = round(estimate, 3), True
      report["vertical_period"].update(
          training_percentiles_20_80=target,
          training_gray_levels=stats_note,
      )
      report["rule"] = (
          "estimated: the section's vertical period is within the training tiles'"
          " percentiles 20-80, so it is left at its own sampling"
          if inside
          else f"estimated: resampled so that its vertical period ({period:.2f} pixels) becomes"
          f" {period * samples:.2f}, the training tiles' percentile"
          f" {_SCALE_RANGE[period > target[1]]}"
      )
  traces = samples if segment.scale_traces == -1 else float(segment.scale_traces)
  if estimated:
    logging.info(
        "Vertical period %.2f pixels, the training tiles' %.2f-%.2f (percentiles 20-80):"
        " resampled by %g (samples) x %g (traces)",
        period,
        *target,
        samples,
        traces,
    )
  report.setdefault("rule", "given (config.segment.scale_samples)")
  report["traces_rule"] = (
      "the factor scale_samples came to (config.segment.scale_traces=-1)"
      if segment.scale_traces == -1
      else "given (config.segment.scale_traces)"
  )
  return (samples, traces), report


def with_scale(segment, factors: tuple[float, float]):
  """A copy of config.segment with the scale factors `choose_scale` chose."""
  segment = copy.deepcopy(segment)
  segment.scale_samples, segment.scale_traces = factors
  return segment


def map_to_model(
    source: SectionInput, scan: Scan, segment, stats: dict | None, stats_note: str = ""
) -> tuple[object, float, dict, dict]:
  """How `segment` gives a scanned input to the model: (config.segment with the
  scale factors chosen, clip level, amplitude report, scale report).

  Refuses a section that holds no tile once resampled (`check_size`).
  """
  factors, scale = choose_scale(scan, segment, stats, stats_note)
  segment = with_scale(segment, factors)
  check_size(source, scan.shape, segment)
  clip, amplitude = choose_clip(source, scan, segment, stats, stats_note)
  return segment, clip, amplitude, scale


def model_gray(values: np.ndarray, amplitude: dict) -> np.ndarray:
  """A section's gray levels as the model is given them, under `choose_clip`'s report."""
  if amplitude["rule"] == "as_is":
    return values
  return amplitude_to_gray(values, amplitude["clip_level"], amplitude.get("zero", 0.0))


def training_gray_levels(config, workdir: pathlib.Path) -> tuple[dict | None, str]:
  """The workdir's gray_levels.json; for older workdirs, computed from the training data.

  Returns (statistics or None, where they came from or why there are none).
  Statistics computed here are saved in the workdir for the next run.
  """
  from saltjax.data import dataset as data_lib
  from saltjax import errors

  path = workdir_lib.gray_levels_path(workdir)
  stats = gray_stats.read(workdir)
  if stats is not None:
    return stats, str(path)
  try:
    data_dir = data_lib.resolve_data_dir(config)
    images = data_lib.load(config, load_test=False).train_images
  except (errors.SaltjaxError, OSError) as e:
    return None, f"{path} is missing and the training data could not be read ({e})"
  if not len(images):
    return None, f"{path} is missing and {data_dir} holds no training images"
  note = f"computed from the training images in {data_dir} ({path} was missing or older)"
  logging.info("Training gray levels: %s", note)
  try:
    stats = gray_stats.write(workdir, images, source=f"{data_dir} (at segment time)")
  except errors.WorkdirError as e:
    logging.warning("could not save the training gray levels: %s", e)
  stats = stats or gray_stats.gray_level_stats(images)
  return stats, note


# -------------------------------------------------------------------- truth ---


def read_truth(path: str | os.PathLike, source: SectionInput, shape: tuple[int, int]) -> np.ndarray:
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


def _truth_counts(truth: np.ndarray, mask: np.ndarray) -> dict:
  """Pixel counts and per-tile competition scores of one line."""
  truth, mask = np.asarray(truth, bool), np.asarray(mask, bool)
  t_tiles, _ = cut_tiles(truth, TILE)
  p_tiles, _ = cut_tiles(mask, TILE)
  return {
      "tp": int((truth & mask).sum()),
      "fp": int((~truth & mask).sum()),
      "fn": int((truth & ~mask).sum()),
      "pixels": int(truth.size),
      "tile_scores": metrics.precision_per_image(t_tiles, p_tiles),
  }


def _scores_of(counts: Sequence[dict]) -> dict:
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
  flush with the section's edge (`tile_starts(length, 101)`).
  """
  return _scores_of([_truth_counts(truth, mask)])


# ----------------------------------------------------------------- ensemble ---


@dataclasses.dataclass
class Ensemble:
  """The workdir's models as one tile predictor, and its post-processing."""

  predict_tiles: Callable[[np.ndarray], np.ndarray]
  models: list[str]
  threshold: float
  min_area: int
  tta: str


def load_ensemble(config, workdir: pathlib.Path) -> Ensemble:
  """Every trained fold's chosen checkpoints (config.predict.checkpoints), with TTA.

  Probabilities are averaged over a fold's checkpoints, then over folds, as
  in `predict.predict_and_submit`.
  """
  from saltjax import checkpoints as ckpt_lib
  from saltjax.model import unet
  from saltjax.inference import predict

  usable, left_out = predict.usable_folds(workdir, config.num_folds, config.predict.checkpoints)
  if not usable:
    raise ckpt_lib.CheckpointError(
        f"{workdir} holds no trained fold with {config.predict.checkpoints!r} checkpoints"
        " (config.predict.checkpoints): train first (python main.py"
        " --config=configs/fold.py --workdir=...)"
    )
  for fold, reason in left_out.items():
    logging.warning("fold %d left out of the ensemble: %s", fold, reason)
  folds = sorted(usable)
  threshold, min_area = _postprocessing(config, workdir)
  model = unet.create_model(config.model)
  members, names = [], []
  for fold in folds:
    fold_dir = workdir / f"fold_{fold}"
    chosen = usable[fold]
    for store, step in chosen:
      members.append(
          (
              predict.load_variables(config, model, fold_dir, store, step),
              1.0 / (len(chosen) * len(folds)),
          )
      )
      names.append(f"fold_{fold}/{store}/{step}")
  return Ensemble(
      tile_predictor(config, model, members), names, threshold, min_area, config.predict.tta
  )


def tile_predictor(
    config, model, members: Sequence[tuple[dict, float]]
) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 (N, 101, 101) tiles -> the weighted sum of the members' TTA probabilities.

  members: (variables, weight) pairs; the weights should sum to 1.
  """
  import jax
  from saltjax.model import tta
  from saltjax import parallel

  mesh = parallel.create_mesh()
  parallel.check_batch_size(config.predict.batch_size, mesh, "config.predict.batch_size")
  infer_fn = jax.jit(
      tta.make_infer_fn(model, config.image_size, config.resize_mode, config.predict.tta)
  )
  on_device = [
      (jax.device_put(variables, parallel.replicated(mesh)), weight)
      for variables, weight in members
  ]

  def predict_tiles(tiles: np.ndarray) -> np.ndarray:
    total = np.zeros(tiles.shape, np.float32)
    for variables, weight in on_device:
      out = tta.predict_probs(
          infer_fn, variables, tiles, batch_size=config.predict.batch_size, mesh=mesh
      )
      total += weight * out["probs"]
    return total

  return predict_tiles


def _postprocessing(config, workdir: pathlib.Path) -> tuple[float, int]:
  """(threshold, min_area): the config's when set, else scores.json's."""
  s = config.segment
  if s.threshold >= 0 and s.min_area >= 0:
    return float(s.threshold), int(s.min_area)
  scores_path = workdir / "scores.json"
  if not scores_path.is_file():
    raise config_checks.ConfigError(
        f"{scores_path} not found: the tuned threshold and minimum area come from a"
        f" prediction run (python main.py --config=configs/predict.py --workdir={workdir}),"
        " or set --config.segment.threshold and --config.segment.min_area"
    )
  try:
    scores = json.loads(scores_path.read_text())
    tuned = float(scores["threshold"]), int(scores["min_area"])
  except (ValueError, KeyError, TypeError) as e:
    raise config_checks.ConfigError(
        f"{scores_path} is unreadable or has no threshold" f" and min_area ({e})"
    ) from e
  return (
      float(s.threshold) if s.threshold >= 0 else tuned[0],
      int(s.min_area) if s.min_area >= 0 else tuned[1],
  )


# ------------------------------------------------------------------ outputs ---


class _StagedOutputs:
  """Files written under temporary names, renamed into place together."""

  def __init__(self, directory: pathlib.Path):
    self.directory = directory
    self.pending: list[tuple[pathlib.Path, pathlib.Path]] = []

  def temp_path(self, name: str) -> pathlib.Path:
    final = self.directory / name
    tmp = self.directory / f".{name}.tmp-{os.getpid()}"
    self.pending.append((tmp, final))
    return tmp

  def write_bytes(self, name: str, data: bytes) -> None:
    self.temp_path(name).write_bytes(data)

  def write_png(self, name: str, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
      raise OSError(f"could not encode {self.directory / name}")
    self.write_bytes(name, encoded.tobytes())

  def commit(self) -> list[pathlib.Path]:
    for tmp, final in self.pending:
      os.replace(tmp, final)
    return [final for _, final in self.pending]

  def discard(self) -> None:
    for tmp, _ in self.pending:
      if tmp.exists():
        tmp.unlink()


def overlay_image(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """BGR picture of the section with the salt outline in red."""
  picture = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
  contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
  thickness = max(1, min(gray.shape) // 300)
  cv2.drawContours(picture, contours, -1, (0, 0, 255), thickness)
  return picture


def output_names(stem: str) -> dict[str, str]:
  """The file names written for an input named <stem>.<ext>."""
  return {
      "probability": f"{stem}_probability.npy",
      "mask": f"{stem}_mask.npy",
      "segy": f"{stem}_probability.sgy",
      "summary": f"{stem}_segment.json",
  }


def _png_name(stem: str, label: str, what: str) -> str:
  return f"{stem}_{label}_{what}.png" if label else f"{stem}_{what}.png"


def _chunks(tiles_per_section: Sequence[int]) -> Iterator[list[int]]:
  """Indices of sections predicted together: about _CHUNK_TILES tiles at a time."""
  chunk, count = [], 0
  for i, n in enumerate(tiles_per_section):
    if chunk and count + n > _CHUNK_TILES:
      yield chunk
      chunk, count = [], 0
    chunk.append(i)
    count += n
  if chunk:
    yield chunk


def segment_input(config, workdir: pathlib.Path, ensemble: Ensemble | None = None) -> dict:
  """Segments config.segment.input with the workdir's ensemble; writes the outputs.

  Returns the summary also written as <stem>_segment.json.
  """
  s = config.segment
  started = time.time()
  source = open_input(
      s.input,
      parse_line_numbers(s.inlines, "inlines"),
      parse_line_numbers(s.crosslines, "crosslines"),
  )
  try:
    scan = scan_input(source)
    stats, note = (None, "")
    if s.amplitude == "match_training" or -1 in (s.scale_samples, s.scale_traces):
      stats, note = training_gray_levels(config, workdir)
    s, clip, amplitude, scale = map_to_model(source, scan, s, stats, note)
    truth = read_truth(s.truth, source, scan.shape) if s.truth else None
    ensemble = ensemble or load_ensemble(config, workdir)
    return _segment_and_write(
        s, workdir, source, clip, amplitude, scale, scan.shape, ensemble, started, truth
    )
  finally:
    source.close()


def _segment_and_write(
    s,
    workdir,
    source: SectionInput,
    clip: float,
    amplitude: dict,
    scale: dict,
    shape: tuple[int, int],
    ensemble: Ensemble,
    started: float,
    truth: np.ndarray | None = None,
) -> dict:
  """Segments every line of `source` and writes the outputs; s: config.segment with
  the scale factors chosen."""
  stem = source.path.stem
  names = output_names(stem)
  out_dir = workdir / SECTIONS_DIR
  out_dir.mkdir(parents=True, exist_ok=True)
  staged = _StagedOutputs(out_dir)
  try:
    stacked = (len(source.sections),) + shape if source.is_volume else shape
    prob_out = np.lib.format.open_memmap(
        staged.temp_path(names["probability"]), mode="w+", dtype=np.float32, shape=stacked
    )
    mask_out = np.lib.format.open_memmap(
        staged.temp_path(names["mask"]), mode="w+", dtype=np.uint8, shape=stacked
    )
    resampled = model_shape(shape, s)
    tiles_per = [
        len(tile_starts(resampled[0], s.stride)) * len(tile_starts(resampled[1], s.stride))
    ] * len(source.sections)
    window = tile_window()
    salt_fraction, truth_counts = {}, {}
    for chunk in _chunks(tiles_per):
      grays = []
      for i in chunk:
        values = source.sections[i].read()
        grays.append(model_gray(values, amplitude))
      outputs = probabilities_and_masks(grays, ensemble, s, window)
      for i, gray, (prob, mask) in zip(chunk, grays, outputs):
        section = source.sections[i]
        target = (i,) if source.is_volume else ()
        prob_out[target] = prob
        mask_out[target] = mask
        staged.write_png(
            _png_name(stem, section.label, "probability"), np.rint(prob * 255.0).astype(np.uint8)
        )
        staged.write_png(_png_name(stem, section.label, "mask"), mask.astype(np.uint8) * 255)
        staged.write_png(_png_name(stem, section.label, "overlay"), overlay_image(gray, mask))
        salt_fraction[section.name] = float(mask.mean())
        where = source.path.name + ("" if section.name == "line" else f" {section.name}")
        logging.info("%s: %.1f%% salt", where, 100 * salt_fraction[section.name])
        if truth is not None:
          truth_counts[section.name] = _truth_counts(truth[i], mask)
          _log_scores(where, _scores_of([truth_counts[section.name]]))
    prob_out.flush()
    mask_out.flush()
    written_segy = None
    if source.kind == "segy":
      written_segy = _write_segy_copy(source, prob_out, staged.temp_path(names["segy"]))
    summary = {
        "input": str(source.path),
        "kind": source.kind,
        "volume": source.is_volume,
        "direction": source.direction if source.is_volume else None,
        "sections": [sec.name for sec in source.sections],
        "shape": list(stacked),
        "layout": ("(lines, samples, traces)" if source.is_volume else "(samples, traces)"),
        "amplitude_to_gray": amplitude["description"],
        "amplitude_rule": amplitude["rule"],
        "clip_level": clip,
        "amplitude": amplitude,
        "stride": s.stride,
        "scale": {
            "samples": s.scale_samples,
            "traces": s.scale_traces,
            "model_shape": list(resampled),
            **scale,
        },
        "threshold": ensemble.threshold,
        "min_area": ensemble.min_area,
        "min_area_section_pixels": section_min_area(ensemble.min_area, s),
        "tta": ensemble.tta,
        "models": ensemble.models,
        "salt_fraction": salt_fraction,
        "seconds": round(time.time() - started, 3),
        "outputs": sorted(p.name for _, p in staged.pending) + [names["summary"]],
    }
    if written_segy:
      summary["segy_traces"] = written_segy
    if truth is not None:
      overall = _scores_of(list(truth_counts.values()))
      summary["truth"] = {
          "path": str(pathlib.Path(s.truth).expanduser()),
          "per_line": {name: _scores_of([c]) for name, c in truth_counts.items()},
          "overall": overall,
          "definitions": (
              "iou, precision and recall of salt pixels (overall: of every line's pixels"
              " together); competition_score: the competition metric averaged over 101x101"
              " tiles side by side, the last of each row and column flush with the section's"
              " edge"
          ),
      }
      if len(truth_counts) > 1:
        _log_scores(f"{source.path.name} (all {len(truth_counts)} lines)", overall)
    staged.write_bytes(names["summary"], (json.dumps(summary, indent=1) + "\n").encode())
    del prob_out, mask_out
    staged.commit()
  except BaseException:
    staged.discard()
    raise
  return summary


def _log_scores(where: str, scores: dict) -> None:
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


def _write_segy_copy(source: SectionInput, probs: np.ndarray, tmp_path: pathlib.Path) -> int:
  """The probability as SEG-Y: the segmented traces of the input, its headers."""
  line_of = {}
  for i, section in enumerate(source.sections):
    for column, trace in enumerate(section.traces):
      line_of[int(trace)] = (i, column)
  traces = np.array(sorted(line_of), np.int64)

  def probability_of(indices: np.ndarray) -> np.ndarray:
    where = [line_of[int(t)] for t in indices]
    if source.is_volume:
      return np.stack([probs[i, :, column] for i, column in where])
    return np.stack([probs[:, column] for _, column in where])

  # write_probability_copy renames into its own target; stage it at tmp_path.
  segy.write_probability_copy(source.segy_file, tmp_path, traces, probability_of)
  return len(traces)


def run(config, workdir) -> dict:
  """What `main.py --config=configs/segment.py` runs."""
  workdir = pathlib.Path(workdir)
  check_config(config)
  segment = config.segment
  trained = config_checks.config_for_prediction(config, workdir)
  trained.segment = segment
  summary = segment_input(trained, workdir)
  out_dir = workdir / SECTIONS_DIR
  print(
      f"segmented {len(summary['sections'])} section(s) of {summary['input']}"
      f" in {summary['seconds']:.1f} s; wrote {out_dir}/{pathlib.Path(summary['input']).stem}_*"
  )
  return summary


# ------------------------------------------------------------------ picture ---


def write_before_after(
    path: str | os.PathLike,
    gray: np.ndarray,
    prob: np.ndarray,
    mask: np.ndarray,
    truth: np.ndarray | None = None,
    title: str = "",
) -> pathlib.Path:
  """A PNG of a section before (gray) and after (probability, salt outline)."""
  from matplotlib import figure as mfigure
  from matplotlib import lines as mlines
  from saltjax import plots

  rows, cols = gray.shape
  fig = mfigure.Figure(
      figsize=(3 * 4.2 * cols / max(rows, cols) + 0.6, 4.2 * rows / max(rows, cols) + 1.1),
      layout="constrained",
  )
  axes = fig.subplots(1, 3)
  panels = (
      ("section (input)", gray, "gray", 255),
      ("salt probability", prob, "magma", 1),
      ("salt mask over the section", gray, "gray", 255),
  )
  for ax, (name, image, cmap, top) in zip(axes, panels):
    ax.imshow(image, cmap=cmap, vmin=0, vmax=top, interpolation="nearest", aspect="auto")
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("trace")
    ax.set_ylabel("sample")
  handles = []
  if truth is not None:
    axes[2].contour(
        np.asarray(truth, float), levels=[0.5], colors=[plots.TRUTH_COLOR], linewidths=2.4
    )
    handles.append(mlines.Line2D([], [], color=plots.TRUTH_COLOR, lw=2.4, label="true body"))
  axes[2].contour(np.asarray(mask, float), levels=[0.5], colors=[plots.PRED_COLOR], linewidths=1.2)
  handles.append(mlines.Line2D([], [], color=plots.PRED_COLOR, lw=1.2, label="predicted salt"))
  fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
  if title:
    fig.suptitle(title, fontsize=11)
  path = pathlib.Path(path)
  workdir_lib.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
  return path


def boost_salt_top(amplitude: np.ndarray, mask: np.ndarray, factor: float = 8.0) -> np.ndarray:
  """The section with the reflection along the salt's outline `factor` times stronger.

  A strong top-of-salt reflection, as on many real lines: it sets the 99th
  percentile of |a|, so the percentile rule maps the layered sediments to
  almost flat gray.
  """
  kernel = np.ones((5, 5), np.uint8)
  mask = np.asarray(mask, np.uint8)
  rim = (cv2.dilate(mask, kernel) - cv2.erode(mask, kernel)) > 0
  return np.where(rim, factor * amplitude, amplitude).astype(np.float32)


def _figure_main(argv: Sequence[str] | None = None) -> None:
  """python -m saltjax.sections.segment --workdir=runs/x --out=docs/section_before_after.png"""
  import argparse
  from configs import segment as segment_config
  from saltjax.data import synthetic

  parser = argparse.ArgumentParser(description="Before/after picture of a synthetic section")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--seed", type=int, default=11)
  parser.add_argument("--rows", type=int, default=256)
  parser.add_argument("--cols", type=int, default=480)
  parser.add_argument(
      "--salt_top", type=float, default=8.0, help="the salt outline's reflection x this"
  )
  args = parser.parse_args(argv)
  workdir = pathlib.Path(args.workdir)
  config = segment_config.get_config()
  trained = config_checks.config_for_prediction(config, workdir)
  trained.segment = config.segment
  ensemble = load_ensemble(trained, workdir)
  stats, _ = training_gray_levels(trained, workdir)
  amplitude, truth = synthetic.generate_section(args.seed, args.rows, args.cols)
  amplitude = boost_salt_top(amplitude, truth, args.salt_top)

  scan = scan_input(in_memory_input(amplitude))
  resolved = with_scale(config.segment, choose_scale(scan, config.segment, stats)[0])
  matched = match_training_clip(*scan.pairs, stats)[0]

  def segment(clip):
    gray = amplitude_to_gray(amplitude, clip)
    ((prob, mask),) = probabilities_and_masks([gray], ensemble, resolved)
    return gray, prob, mask, truth_scores(truth, mask)["iou"]

  gray, prob, mask, iou = segment(matched)
  percentile_iou = segment(clip_level(amplitude, DEFAULT_CLIP_PERCENTILE))[3]
  title = (
      f"synthetic {args.rows} x {args.cols} section (seed {args.seed}, salt-top reflection"
      f" x{args.salt_top:g}), {len(ensemble.models)} model(s)\nIoU with the true body: {iou:.2f}"
      f" with the default amplitude rule ('match_training'); {percentile_iou:.2f} with the"
      " 99th-percentile clip"
  )
  print(write_before_after(args.out, gray, prob, mask, truth, title), title)


if __name__ == "__main__":
  _figure_main()

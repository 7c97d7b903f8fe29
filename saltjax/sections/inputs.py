"""The input of a segmentation: a SEG-Y line or volume, a .npy array or a PNG, as sections.

Sections are (samples, traces): depth down the rows, traces along the
columns. `scan_input` reads every one once, before anything is written:
it checks them and samples the amplitudes the clip level and the scale
factors are chosen from.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable, Sequence

import cv2
import numpy as np

from saltjax.data import gray_stats
from saltjax.data.layout import DataError
from saltjax.sections import segy
from saltjax.sections.tiling import TILE

# At most this many |amplitude| values (evenly strided) set the clip level.
_CLIP_SAMPLE = 4_000_000
# Vertical pairs of samples (drawn with a fixed seed) that the fit measures.
_MATCH_SAMPLE = 100_000
# At most this many traces (evenly strided over every line) measure the vertical period.
_PERIOD_TRACES = 2000


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
  depends on the scale factors: `segment.map_to_model` checks that once they are chosen.
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

"""SEG-Y in and out, through segyio: sections to segment, probabilities back.

A SEG-Y file is a sequence of traces, each with a 240-byte header; segyio
reads trace i as a 1-D array of samples (time or depth).  The file's geometry
is read from the trace headers (inline at byte 189, crossline at byte 193,
segyio's defaults):

* a 3-D volume has at least two inlines and two crosslines, and one trace
  for every (inline, crossline) pair: a regular grid, in any trace order;
* anything else is a 2-D line: every trace of the file, in file order.

A section is returned as a float32 array (samples, traces): depth down the
rows and traces along the columns, as in the Kaggle tiles.  segyio's own
arrays are (traces, samples), hence the transposes below.

The probability copy has the input's textual, binary and trace headers and
the input's trace order; its samples are the salt probability.  Integer
sample formats (which would round every probability to 0 or 1) become IEEE
float (format 5); IBM float, IEEE float and IEEE double (format 6) files keep
their format (a double holds every float32 probability exactly).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable, Sequence

import numpy as np
import segyio

from saltjax import workdir as workdir_lib
from saltjax.data.layout import DataError

# Sample formats segyio reads: 1 IBM float, 2/3/8 two's complement integers
# (4, 2, 1 bytes), 5 IEEE float, 6 IEEE double, 10/11/16 unsigned integers.
_FORMATS = {
    1: "IBM float",
    2: "int32",
    3: "int16",
    5: "IEEE float",
    6: "IEEE double",
    8: "int8",
    10: "uint32",
    11: "uint16",
    16: "uint8",
}
_FLOAT_FORMATS = (1, 5, 6)  # kept by the probability copy
_IEEE_FLOAT = 5

INLINE, CROSSLINE = "inline", "crossline"


@dataclasses.dataclass(frozen=True)
class Line:
  """One section of a SEG-Y file: a name and its traces in section order."""

  name: str  # "line" (2-D), "inline 105", "crossline 7"
  number: int
  traces: np.ndarray  # trace indices in the file, left to right


class SegyFile:
  """An open SEG-Y file whose geometry is known; use as a context manager."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise DataError(f"{self.path}: no such file")
    try:
      self._file = segyio.open(str(self.path), "r", ignore_geometry=True)
    except (RuntimeError, OSError, ValueError) as e:
      raise DataError(f"{self.path}: not a readable SEG-Y file ({e})") from e
    try:
      self._read_geometry()
    except BaseException:
      self._file.close()
      raise

  def _read_geometry(self) -> None:
    f = self._file
    fmt = int(f.bin[segyio.BinField.Format])
    if fmt not in _FORMATS:
      raise DataError(
          f"{self.path}: not a SEG-Y file that can be read (sample format"
          f" code {fmt} in the binary header is not a SEG-Y format)"
      )
    self.format = fmt
    self.num_samples = len(f.samples)
    self.num_traces = f.tracecount
    if self.num_samples < 1 or self.num_traces < 1:
      raise DataError(
          f"{self.path}: holds {self.num_traces} traces of"
          f" {self.num_samples} samples; nothing to segment"
      )
    inlines = np.asarray(f.attributes(segyio.TraceField.INLINE_3D)[:], np.int64)
    crosslines = np.asarray(f.attributes(segyio.TraceField.CROSSLINE_3D)[:], np.int64)
    self.inline_numbers = np.unique(inlines)
    self.crossline_numbers = np.unique(crosslines)
    n_il, n_xl = len(self.inline_numbers), len(self.crossline_numbers)
    self.is_volume = n_il >= 2 and n_xl >= 2
    if not self.is_volume:
      return
    # grid[i, j]: the trace of the i-th inline and j-th crossline.
    il = np.searchsorted(self.inline_numbers, inlines)
    xl = np.searchsorted(self.crossline_numbers, crosslines)
    grid = np.full((n_il, n_xl), -1, np.int64)
    grid[il, xl] = np.arange(self.num_traces)
    if self.num_traces != n_il * n_xl or (grid < 0).any():
      raise DataError(
          f"{self.path}: irregular 3-D geometry ({self.num_traces} traces for"
          f" {n_il} inlines x {n_xl} crosslines in the headers at bytes 189/193);"
          " only regular volumes (one trace per inline/crossline pair) can be segmented"
      )
    self._grid = grid

  def lines(self, direction: str = INLINE, numbers: Sequence[int] | None = None) -> list[Line]:
    """The sections to segment: the 2-D line, or a volume's chosen lines.

    numbers: inline (or crossline) numbers as in the trace headers; None for
    every line of that direction.
    """
    if not self.is_volume:
      if numbers is not None:
        raise DataError(
            f"{self.path}: is a 2-D line (its trace headers do not describe a 3-D"
            f" grid), so config.segment.{direction}s cannot select lines in it"
        )
      return [Line("line", 0, np.arange(self.num_traces))]
    available = self.inline_numbers if direction == INLINE else self.crossline_numbers
    if numbers is None:
      numbers = available.tolist()
    missing = sorted(set(numbers) - set(available.tolist()))
    if missing:
      raise DataError(
          f"{self.path}: has no {direction}(s) {', '.join(map(str, missing[:10]))};"
          f" its {direction}s run from {available.min()} to {available.max()}"
          f" ({len(available)} lines)"
      )
    out = []
    for number in numbers:
      k = int(np.searchsorted(available, number))
      traces = self._grid[k] if direction == INLINE else self._grid[:, k]
      out.append(Line(f"{direction} {number}", int(number), traces.copy()))
    return out

  def read(self, line: Line) -> np.ndarray:
    """The line's samples as float32 (samples, traces)."""
    traces = line.traces
    if len(traces) and np.array_equal(traces, np.arange(traces[0], traces[0] + len(traces))):
      data = self._file.trace.raw[int(traces[0]) : int(traces[-1]) + 1]
    else:
      data = np.stack([self._file.trace.raw[int(t)] for t in traces])
    return np.ascontiguousarray(np.asarray(data, np.float32).reshape(len(traces), -1).T)

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> "SegyFile":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_probability_copy(
    source: SegyFile,
    out_path: str | os.PathLike,
    traces: np.ndarray,
    probability_of: Callable[[np.ndarray], np.ndarray],
) -> pathlib.Path:
  """Writes a SEG-Y copy of `traces` of `source` whose samples are probabilities.

  Args:
    source: the open input file.
    out_path: where to write; the file appears there complete or not at all
      (it is written under a temporary name in the same directory first).
    traces: the trace indices to copy, written in increasing file order.
    probability_of: maps an array of trace indices to their probabilities,
      (len(indices), samples) float32.

  Returns:
    out_path.
  """
  out_path = pathlib.Path(out_path)
  traces = np.sort(np.asarray(traces, np.int64))
  src = source._file
  spec = segyio.spec()
  spec.samples = src.samples
  spec.tracecount = len(traces)
  spec.format = source.format if source.format in _FLOAT_FORMATS else _IEEE_FLOAT
  spec.endian = src.endian
  spec.ext_headers = src.ext_headers

  def write(tmp):
    with segyio.create(str(tmp), spec) as dst:
      dst.text[0] = src.text[0]
      for i in range(1, src.ext_headers + 1):
        dst.text[i] = src.text[i]
      binary = dict(src.bin)
      binary[segyio.BinField.Format] = spec.format
      dst.bin.update(binary)
      chunk = 1024
      for start in range(0, len(traces), chunk):
        part = traces[start : start + chunk]
        values = np.asarray(probability_of(part), np.float32)
        for k, t in enumerate(part):
          dst.header[start + k] = src.header[int(t)]
          dst.trace[start + k] = values[k]

  workdir_lib.write_atomic(out_path, write)
  return out_path


def write_section(
    path: str | os.PathLike,
    section: np.ndarray,
    *,
    inlines: Sequence[int] | None = None,
    sample_interval_us: int = 4000,
    first_cdp: int = 1,
) -> pathlib.Path:
  """Writes float32 (samples, traces) -- or (lines, samples, traces) -- as SEG-Y.

  A small writer for tests, benchmarks and demonstrations: IEEE float samples,
  and trace headers numbering the traces (sequence, CDP, crossline) and, for
  a volume, the inlines (`inlines`, default 1, 2, ...).
  """
  path = pathlib.Path(path)
  section = np.asarray(section, np.float32)
  lines = section[None] if section.ndim == 2 else section
  n_lines, n_samples, n_traces = lines.shape
  volume = section.ndim == 3
  inlines = list(inlines) if inlines is not None else list(range(1, n_lines + 1))
  spec = segyio.spec()
  spec.samples = np.arange(n_samples) * sample_interval_us / 1000.0
  spec.format = _IEEE_FLOAT
  spec.tracecount = n_lines * n_traces
  with segyio.create(str(path), spec) as f:
    f.bin.update(hns=n_samples, hdt=sample_interval_us, format=_IEEE_FLOAT)
    for i in range(n_lines):
      for j in range(n_traces):
        k = i * n_traces + j
        header = {
            segyio.TraceField.TRACE_SEQUENCE_LINE: k + 1,
            segyio.TraceField.TRACE_SEQUENCE_FILE: k + 1,
            segyio.TraceField.CDP: first_cdp + j,
            segyio.TraceField.TRACE_SAMPLE_COUNT: n_samples,
            segyio.TraceField.TRACE_SAMPLE_INTERVAL: sample_interval_us,
        }
        if volume:
          header[segyio.TraceField.INLINE_3D] = inlines[i]
          header[segyio.TraceField.CROSSLINE_3D] = j + 1
        f.header[k] = header
        f.trace[k] = np.ascontiguousarray(lines[i, :, j])
  return path

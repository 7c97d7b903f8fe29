"""What a segmentation writes under <workdir>/sections/, and how.

Each file is written under a temporary name first and all are renamed into
place at the end (`StagedOutputs`): nothing is written when the input is bad.
"""

from __future__ import annotations

import os
import pathlib

import cv2
import numpy as np

from saltjax.sections import inputs
from saltjax.sections import segy

SECTIONS_DIR = "sections"


class StagedOutputs:
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


def write_line_pngs(
    staged: StagedOutputs,
    stem: str,
    label: str,
    gray: np.ndarray,
    prob: np.ndarray,
    mask: np.ndarray,
) -> None:
  """A line's probability (8-bit), mask and overlay PNGs."""
  staged.write_png(_png_name(stem, label, "probability"), np.rint(prob * 255.0).astype(np.uint8))
  staged.write_png(_png_name(stem, label, "mask"), mask.astype(np.uint8) * 255)
  staged.write_png(_png_name(stem, label, "overlay"), overlay_image(gray, mask))


def _png_name(stem: str, label: str, what: str) -> str:
  return f"{stem}_{label}_{what}.png" if label else f"{stem}_{what}.png"


def write_segy_copy(source: inputs.SectionInput, probs: np.ndarray, tmp_path: pathlib.Path) -> int:
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

"""Resampling a section to the model's sampling: the scale factors and the resampling.

The features of a section (layers, salt edges) should be the size the model
learned them at: a section sampled twice as finely is shrunk by 2 before it
is tiled, and its probability enlarged back. `choose_scale` estimates the
factor down the traces from the section's vertical period against the
training tiles'.
"""

from __future__ import annotations

import copy
import logging

import cv2
import numpy as np

from saltjax.data import gray_stats
from saltjax.data.layout import DataError
from saltjax.sections import inputs
from saltjax.sections.tiling import TILE

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


def model_shape(shape: tuple[int, int], segment) -> tuple[int, int]:
  """(samples, traces) of a section once resampled by segment.scale_samples / scale_traces."""
  if not (segment.scale_samples > 0 and segment.scale_traces > 0):
    raise ValueError("the scale factors are not chosen yet: see resampling.choose_scale")
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


def check_size(source: inputs.SectionInput, shape: tuple[int, int], segment) -> None:
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


def choose_scale(
    scan: inputs.Scan, segment, stats: dict | None, stats_note: str = ""
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

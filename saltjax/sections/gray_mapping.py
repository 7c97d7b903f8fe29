"""Amplitudes to the model's gray levels: the clip level and the mapping.

gray = 127.5 + 127.5 * clip(a / c, -1, 1), rounded (`amplitude_to_gray`).
The clip level c is chosen by config.segment.amplitude (`choose_clip`):
'match_training' fits it so that the section's gray levels match the
training tiles' (`match_training_clip`, against <workdir>/gray_levels.json),
'percentile' and 'value' take it from |a| or the config; 'as_is' gives an
8-bit picture to the model unchanged.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Sequence

import numpy as np

from saltjax.data import gray_stats
from saltjax.data.layout import DataError
from saltjax.sections import inputs
from saltjax import workdir as workdir_lib

# segment.amplitude: how the clip level is chosen.
AMPLITUDE_RULES = ("match_training", "percentile", "value", "as_is")
DEFAULT_CLIP_PERCENTILE = 99.0
# The percentiles of |gray - middle gray| that a section is fitted to: the upper
# half, set by the layered sediments (the lower half is mostly the weak inside
# of salt, whose share varies from section to section, and noise), below the
# strongest 10% of samples (a few strong reflectors do not move them).
MATCH_PERCENTILES = (50, 60, 70, 80, 90)
# Samples with |a| above this many times the median |a| are not fitted (in the
# training tiles |gray - median| reaches about 11x its median at the 99th
# percentile, and a Laplace distribution passes 20x once in a million).
_OUTLIER_RATIO = 20.0
# Candidate gains around the first estimate: 2**-3 to 2**3 in steps of 7%,
# then around the best of those in steps of 0.35%.
_MATCH_COARSE = 2.0 ** np.linspace(-3.0, 3.0, 61)
_MATCH_FINE = 2.0 ** np.linspace(-0.1, 0.1, 21)


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


def matched_clip(amplitudes: Sequence[np.ndarray], stats: dict) -> tuple[float, dict]:
  """The 'match_training' clip level of in-memory amplitude sections (signed, zero
  amplitude at 0), as `segment` finds it for a file of them."""
  return match_training_clip(
      *inputs.scan_input(inputs.in_memory_input(list(amplitudes))).pairs, stats
  )


def choose_clip(
    source: inputs.SectionInput,
    scan: inputs.Scan,
    segment,
    stats: dict | None,
    stats_note: str = "",
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

"""The `segment` section of the config: its values checked, its line numbers parsed."""

from __future__ import annotations

import pathlib

from saltjax.errors import ConfigError
from saltjax.sections import gray_mapping
from saltjax.sections import resampling
from saltjax.sections.tiling import TILE


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
    raise ConfigError(
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
      s.amplitude in gray_mapping.AMPLITUDE_RULES,
      "amplitude",
      "use " + ", ".join(repr(r) for r in gray_mapping.AMPLITUDE_RULES),
  )
  need(0 < s.clip_percentile <= 100, "clip_percentile", "must be in (0, 100]")
  for key, auto in (
      ("scale_samples", "estimated from the section"),
      ("scale_traces", "the factor scale_samples comes to"),
  ):
    need(
        isinstance(s[key], (int, float)) and (0 < s[key] <= resampling.MAX_SCALE or s[key] == -1),
        key,
        f"must be a factor in (0, {resampling.MAX_SCALE:g}] (1: the section's own sampling), or -1"
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
      s.amplitude == "percentile" or s.clip_percentile == gray_mapping.DEFAULT_CLIP_PERCENTILE,
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
    raise ConfigError("bad config:\n  " + "\n  ".join(problems))
  parse_line_numbers(s.inlines, "inlines")
  parse_line_numbers(s.crosslines, "crosslines")

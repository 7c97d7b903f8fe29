"""Amplitudes to the model's gray levels (saltjax/sections/gray_mapping.py) against
hand-set distributions, scales and pictures."""

import numpy as np
import pytest

from saltjax import errors
from saltjax.data import synthetic
from saltjax.sections import gray_mapping
from saltjax.sections import inputs

ROWS, COLS = 250, 400  # samples x traces: the size of test_sections.py's sections


def test_amplitude_to_gray_is_symmetric_clipping():
  # clip level 2: -2 and below -> 0, 0 -> 127.5 (rounds to 128), 1 -> 191.25, 2+ -> 255
  gray = gray_mapping.amplitude_to_gray(np.array([-5.0, -2.0, -1.0, 0.0, 1.0, 2.0, 7.0]), 2.0)
  np.testing.assert_array_equal(gray, [0, 0, 64, 128, 191, 255, 255])
  assert gray.dtype == np.uint8
  # the 99th percentile of |a| over 0..100 (linear interpolation) is 99
  assert gray_mapping.clip_level(-np.arange(101.0), 99) == pytest.approx(99.0)


def test_gray_level_stats_of_a_hand_made_tile():
  from saltjax.data import gray_stats

  # One 3 x 2 tile: median (20 + 30) / 2 = 25, so |gray - median| is 15, 5, 5,
  # 5, 25, 25, and the vertical steps |20-10|, |20-30|, |50-20|, |50-20| are
  # 10, 10, 30, 30.
  tile = np.array([[10, 30], [20, 20], [50, 50]], np.uint8)
  stats = gray_stats.gray_level_stats(tile[None])
  at = dict(zip(stats["percentiles"], zip(stats["deviation"], stats["contrast"])))
  assert at[50] == (10.0, 20.0)  # medians of {5,5,5,15,25,25} and {10,10,30,30}
  assert at[20] == (5.0, 10.0)  # linear interpolation: rank 1.0 of 0..5, 0.6 of 0..3
  assert stats["images"] == 1 and stats["mean_gray"] == pytest.approx(30.0)


def _exponential_stats(scale):
  """Training statistics whose |gray - middle| is exponential with this mean (in grays)."""
  from saltjax.data import gray_stats

  p = np.array(gray_stats.PERCENTILES, float) / 100
  return {
      "percentiles": list(gray_stats.PERCENTILES),
      "deviation": list(-scale * np.log1p(-p)),
      "contrast": list(-scale * np.log1p(-p)),
  }


def test_match_training_clip_maps_a_known_distribution_to_the_training_gray_levels():
  # Laplace amplitudes of scale b have |a| exponential with mean b; training
  # deviations exponential with mean 20 grays: the gain is 20 / b grays per
  # unit of amplitude, i.e. the clip level 127.5 * b / 20, at any scale b.
  rng = np.random.default_rng(0)
  base = rng.laplace(0.0, 1.0, (300, 400)).astype(np.float32)
  stats = _exponential_stats(20.0)
  for b in (0.01, 1.0, 1000.0):
    clip, report = gray_mapping.matched_clip([b * base], stats)
    assert clip == pytest.approx(127.5 * b / 20.0, rel=0.03), b
    got, want = report["deviation"]["section"], report["deviation"]["training"]
    assert np.allclose(got, want, rtol=0.1, atol=1.0), (got, want)


def test_default_mapping_is_the_same_at_any_scale_and_with_a_strong_reflector():
  stats = _exponential_stats(12.0)
  amplitude, mask = synthetic.generate_section(11, ROWS, COLS)
  clip, _ = gray_mapping.matched_clip([amplitude], stats)
  gray = gray_mapping.amplitude_to_gray(amplitude, clip)
  for scale in (0.01, 1000.0):
    scaled_clip, _ = gray_mapping.matched_clip([scale * amplitude], stats)
    assert scaled_clip / scale == pytest.approx(clip, rel=1e-4)
    other = gray_mapping.amplitude_to_gray(scale * amplitude, scaled_clip)
    assert (other != gray).mean() < 1e-3
  # A reflector 30x the sediments' peak, 2% of the samples: the 99th
  # percentile becomes its amplitude, while the fitted clip moves by a few %
  # (the reflector's samples, over 20x the median |a|, are not fitted).
  strong = amplitude.copy()
  strong[60:65] = 30 * np.abs(amplitude).max() * np.sign(amplitude[60:65] + 1e-9)
  strong_clip, _ = gray_mapping.matched_clip([strong], stats)
  assert strong_clip == pytest.approx(clip, rel=0.05)
  assert gray_mapping.clip_level(strong, 99) > 10 * gray_mapping.clip_level(amplitude, 99)
  outside = np.ones(amplitude.shape, bool)
  outside[60:65] = False
  changed = gray_mapping.amplitude_to_gray(strong, strong_clip)[outside].astype(int) - gray[outside]
  assert np.abs(changed).mean() < 2.0  # gray levels


def test_a_picture_is_mapped_as_the_amplitudes_it_shows():
  # Laplace amplitudes (not the generator's) drawn as 8-bit pictures darker,
  # lighter, flatter or harsher than the training tiles: gray = round(mid + k a).
  # The picture's zero amplitude is its median gray, mid; its clip level in
  # grays is k times the amplitudes' own; the grays given to the model are
  # the amplitudes' but for the picture's rounding to whole grays.
  import types

  rng = np.random.default_rng(0)
  amplitude = rng.laplace(0.0, 1.0, (300, 400)).astype(np.float32)
  stats = _exponential_stats(20.0)
  clip, _ = gray_mapping.matched_clip([amplitude], stats)
  gray = gray_mapping.amplitude_to_gray(amplitude, clip)
  segment = types.SimpleNamespace(amplitude="match_training", clip_percentile=99.0, clip_value=0.0)
  for mid, k in ((128, 10.0), (70, 4.0), (190, 25.0), (100, 2.0)):
    picture = np.clip(np.rint(mid + k * amplitude), 0, 255).astype(np.uint8)
    source = inputs.in_memory_input(picture, "picture.npy")
    scan = inputs.scan_input(source)
    picture_clip, report = gray_mapping.choose_clip(source, scan, segment, stats)
    assert report["zero"] == mid
    # Rounding to whole grays moves the fitted percentiles by at most half a gray.
    assert picture_clip == pytest.approx(k * clip, rel=0.05), (mid, k)
    mapped = gray_mapping.amplitude_to_gray(picture, picture_clip, report["zero"])
    # Away from the picture's own clipping, a sample moves by at most half a
    # picture gray (127.5 / picture_clip model grays), one model gray of
    # rounding and the few % the fitted gains differ by.
    unclipped = (picture > 0) & (picture < 255)
    moved = np.abs(mapped.astype(int) - gray)[unclipped]
    assert moved.mean() < 1.0 + 0.5 * 127.5 / picture_clip, (mid, k, moved.mean())
  # A 16-bit picture (min-max stretched, as 16-bit exports are): the same.
  lo, hi = amplitude.min(), amplitude.max()
  k = 65535 / (hi - lo)
  deep = np.rint((amplitude - lo) * k).astype(np.uint16)
  source = inputs.in_memory_input(deep, "picture16.npy")
  picture_clip, report = gray_mapping.choose_clip(source, inputs.scan_input(source), segment, stats)
  assert report["zero"] == pytest.approx((np.median(amplitude) - lo) * k, abs=1.0)
  assert picture_clip == pytest.approx(k * clip, rel=0.01)
  # Floats that are never negative (a picture read into [0, 1]): a picture too.
  unit = ((amplitude - lo) / (hi - lo)).astype(np.float32)
  source = inputs.in_memory_input(unit, "picture01.npy")
  picture_clip, report = gray_mapping.choose_clip(source, inputs.scan_input(source), segment, stats)
  assert report["zero"] == pytest.approx((np.median(amplitude) - lo) / (hi - lo), abs=1e-6)
  assert picture_clip == pytest.approx(clip / (hi - lo), rel=0.01)
  # 'as_is' is for 8-bit pictures only.
  segment.amplitude = "as_is"
  for name, values in (("amplitudes.npy", amplitude), ("picture16.npy", deep)):
    source = inputs.in_memory_input(values, name)
    with pytest.raises(errors.DataError, match=rf"{name}: .*amplitude='as_is'"):
      gray_mapping.choose_clip(source, inputs.scan_input(source), segment, stats)

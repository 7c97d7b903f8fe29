"""Whole-section segmentation: SEG-Y / .npy / PNG in, salt probability and masks out.

A tiny model is trained once (module fixture) on the embedded synthetic tiles,
then asked to find the salt body of synthetic sections several tiles wide,
whose true masks the generator knows.
"""

import json
import pathlib

import cv2
import numpy as np
import pytest
import segyio

from saltjax.sections import segment
from saltjax.sections import segy
from saltjax.data import synthetic
from tests.conftest import run_main, tiny_config

ROWS, COLS = 250, 400  # samples x traces of the test section: 4 x 7 tiles at stride 50
# The tiny model's training: enough for the salt body to be found clearly.
# Fold 0 of 4 trains on 96 synthetic tiles, 12 steps an epoch (about 50 s of CPU time).
TRAIN = {
    "synthetic.num_train": 128,
    "num_folds": 4,
    "fold": 0,
    "num_epochs": 8,
    "schedule.cycle_epochs": 8,
    "batch_size": 8,
    "model.encoder_width": 8,
    "predict.tta": "none",
    "predict.batch_size": 32,
}


def _run(config, workdir):
  from saltjax.app import run

  return run.main(config, str(workdir))


def _segment_config(compile_cache, path, **segment):
  from configs import segment as segment_config

  config = segment_config.get_config()
  config.compilation_cache = compile_cache
  config.progress = False
  config.predict.tta = "none"
  config.predict.batch_size = 32
  config.segment.input = str(path)
  for key, value in segment.items():
    config.segment[key] = value
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache, compile_cache):
  """A workdir with one trained fold and the tuned post-processing (scores.json)."""
  workdir = tmp_path_factory.mktemp("sections") / "run"
  config = tiny_config(data_cache, compile_cache, **TRAIN)
  assert _run(config, workdir) == 0
  from configs import predict as predict_config

  config = predict_config.get_config()
  config.compilation_cache = compile_cache
  config.progress = False
  config.predict.tta = "none"
  config.predict.batch_size = 32
  assert _run(config, workdir) == 0
  return workdir


def _iou(a, b):
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  return (a & b).sum() / max((a | b).sum(), 1)


def _segy_line(path, seed):
  amplitude, mask = synthetic.generate_section(seed, ROWS, COLS)
  # Arbitrary units, as in real data: the clipping rule makes them irrelevant.
  segy.write_section(path, 350.0 * amplitude)
  return amplitude, mask


# ------------------------------------------------------------ pure pieces ---


def test_amplitude_to_gray_is_symmetric_clipping():
  # clip level 2: -2 and below -> 0, 0 -> 127.5 (rounds to 128), 1 -> 191.25, 2+ -> 255
  gray = segment.amplitude_to_gray(np.array([-5.0, -2.0, -1.0, 0.0, 1.0, 2.0, 7.0]), 2.0)
  np.testing.assert_array_equal(gray, [0, 0, 64, 128, 191, 255, 255])
  assert gray.dtype == np.uint8
  # the 99th percentile of |a| over 0..100 (linear interpolation) is 99
  assert segment.clip_level(-np.arange(101.0), 99) == pytest.approx(99.0)


def test_tiles_cover_the_section_and_blending_a_consistent_field_returns_it():
  np.testing.assert_array_equal(segment.tile_starts(101, 50), [0])
  np.testing.assert_array_equal(segment.tile_starts(300, 50), [0, 50, 100, 150, 199])
  np.testing.assert_array_equal(segment.tile_starts(202, 101), [0, 101])
  with pytest.raises(ValueError):
    segment.tile_starts(100, 50)
  window = segment.tile_window()
  assert window.min() > 0 and window.max() <= 1
  np.testing.assert_allclose(window, window.T)
  np.testing.assert_allclose(window, window[::-1, ::-1])
  # If every tile predicts exactly the crop of one field, the blend is that field.
  rng = np.random.default_rng(0)
  field = rng.random((230, 317))
  tiles, origins = segment.cut_tiles(field, 37)
  covered = np.zeros(field.shape, bool)
  for r, c in origins:
    covered[r : r + 101, c : c + 101] = True
  assert covered.all()
  blended = segment.blend_tiles(tiles, origins, field.shape, window)
  np.testing.assert_allclose(blended, field, rtol=1e-6)


def test_remove_small_regions_counts_8_connected_pixels():
  mask = np.zeros((8, 8), bool)
  mask[0, 0] = mask[1, 1] = True  # one diagonal region of 2
  mask[5:8, 5:8] = True  # 9
  assert segment.remove_small_regions(mask, 3).sum() == 9
  assert segment.remove_small_regions(mask, 2).sum() == 11
  assert segment.remove_small_regions(mask, 10).sum() == 0


def test_segy_section_orientation_matches_segyio(tmp_path):
  # value = 1000 * sample + trace: depth down the rows, traces along the columns
  section = (1000.0 * np.arange(120)[:, None] + np.arange(130)[None, :]).astype(np.float32)
  path = segy.write_section(tmp_path / "line.sgy", section)
  with segyio.open(str(path), ignore_geometry=True) as f:
    assert f.tracecount == 130 and len(f.samples) == 120
    assert f.trace[7][11] == 11 * 1000 + 7  # trace 7, sample 11
  with segy.SegyFile(path) as f:
    assert not f.is_volume
    (line,) = f.lines()
    np.testing.assert_array_equal(f.read(line), section)


def test_generate_section_draws_a_known_dome_with_the_tile_renderer():
  amplitude, mask = synthetic.generate_section(5, 220, 310)
  again, mask_again = synthetic.generate_section(5, 220, 310)
  np.testing.assert_array_equal(amplitude, again)
  np.testing.assert_array_equal(mask, mask_again)
  assert amplitude.shape == mask.shape == (220, 310) and amplitude.dtype == np.float32
  assert set(np.unique(mask)) == {0, 1} and np.isfinite(amplitude).all()
  # A diapir rising from the base: salt below a top-of-salt surface, so every
  # column is sediment above some depth and salt below it, and the body
  # reaches the base but not the top.
  assert (np.diff(mask.astype(int), axis=0) >= 0).all()
  assert mask[-1].any() and not mask[0].any()
  # Salt's inside is weak and chaotic: its amplitudes spread less than the
  # layered sediments' (the texture the tiles taught the model).
  inside = cv2.erode(mask, np.ones((7, 7), np.uint8)) > 0
  outside = cv2.dilate(mask, np.ones((7, 7), np.uint8)) == 0
  assert amplitude[inside].std() < 0.7 * amplitude[outside].std()
  assert not np.array_equal(synthetic.generate_section(6, 220, 310)[1], mask)
  # The clipping rule puts the section in the gray range the model learned
  # from: its spread lies inside the middle 90% of the training tiles' spreads.
  gray = segment.amplitude_to_gray(amplitude, segment.clip_level(amplitude, 99))
  tile_spreads = [
      synthetic.generate_example(np.random.default_rng([0, 0, i]))[0].std() for i in range(100)
  ]
  low, high = np.percentile(tile_spreads, [5, 95])
  assert low < gray.std() < high, (low, gray.std(), high)
  assert abs(gray.mean() - 127.5) < 10


@pytest.mark.parametrize("fmt, kept", [(1, 1), (5, 5), (3, 5), (8, 5)])
def test_probability_copy_keeps_float_formats_and_makes_integers_float(tmp_path, fmt, kept):
  src_path = tmp_path / f"in{fmt}.sgy"
  spec = segyio.spec()
  spec.samples = list(range(110))
  spec.tracecount = 6
  spec.format = fmt
  with segyio.create(str(src_path), spec) as f:
    f.bin.update(hns=110, hdt=2000, format=fmt)
    f.text[0] = segyio.tools.create_text_header({1: "SALT TEST", 2: f"FORMAT {fmt}"})
    for i in range(6):
      f.header[i] = {
          segyio.TraceField.CDP: 500 + i,
          segyio.TraceField.offset: 7 * i,
          segyio.TraceField.SourceX: 1000 * i,
      }
      f.trace[i] = np.full(110, i + 1, f.dtype)
  probs = np.linspace(0.0, 1.0, 6 * 110, dtype=np.float32).reshape(6, 110)
  with segy.SegyFile(src_path) as source:
    segy.write_probability_copy(source, tmp_path / "out.sgy", np.arange(6), lambda idx: probs[idx])
  with segyio.open(str(src_path), ignore_geometry=True) as src, segyio.open(
      str(tmp_path / "out.sgy"), ignore_geometry=True
  ) as dst:
    assert dst.bin[segyio.BinField.Format] == kept
    assert dst.text[0] == src.text[0]
    for i in range(6):
      assert dict(dst.header[i]) == dict(src.header[i])
    # IBM float keeps about 6 significant digits; IEEE is exact.
    np.testing.assert_allclose(dst.trace.raw[:], probs, atol=1e-6)
  assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


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
    clip, report = segment.matched_clip([b * base], stats)
    assert clip == pytest.approx(127.5 * b / 20.0, rel=0.03), b
    got, want = report["deviation"]["section"], report["deviation"]["training"]
    assert np.allclose(got, want, rtol=0.1, atol=1.0), (got, want)


def test_default_mapping_is_the_same_at_any_scale_and_with_a_strong_reflector():
  stats = _exponential_stats(12.0)
  amplitude, mask = synthetic.generate_section(11, ROWS, COLS)
  clip, _ = segment.matched_clip([amplitude], stats)
  gray = segment.amplitude_to_gray(amplitude, clip)
  for scale in (0.01, 1000.0):
    scaled_clip, _ = segment.matched_clip([scale * amplitude], stats)
    assert scaled_clip / scale == pytest.approx(clip, rel=1e-4)
    other = segment.amplitude_to_gray(scale * amplitude, scaled_clip)
    assert (other != gray).mean() < 1e-3
  # A reflector 30x the sediments' peak, 2% of the samples: the 99th
  # percentile becomes its amplitude, while the fitted clip moves by a few %
  # (the reflector's samples, over 20x the median |a|, are not fitted).
  strong = amplitude.copy()
  strong[60:65] = 30 * np.abs(amplitude).max() * np.sign(amplitude[60:65] + 1e-9)
  strong_clip, _ = segment.matched_clip([strong], stats)
  assert strong_clip == pytest.approx(clip, rel=0.05)
  assert segment.clip_level(strong, 99) > 10 * segment.clip_level(amplitude, 99)
  outside = np.ones(amplitude.shape, bool)
  outside[60:65] = False
  changed = segment.amplitude_to_gray(strong, strong_clip)[outside].astype(int) - gray[outside]
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
  clip, _ = segment.matched_clip([amplitude], stats)
  gray = segment.amplitude_to_gray(amplitude, clip)
  segment = types.SimpleNamespace(amplitude="match_training", clip_percentile=99.0, clip_value=0.0)
  for mid, k in ((128, 10.0), (70, 4.0), (190, 25.0), (100, 2.0)):
    picture = np.clip(np.rint(mid + k * amplitude), 0, 255).astype(np.uint8)
    source = segment.in_memory_input(picture, "picture.npy")
    scan = segment.scan_input(source)
    picture_clip, report = segment.choose_clip(source, scan, segment, stats)
    assert report["zero"] == mid
    # Rounding to whole grays moves the fitted percentiles by at most half a gray.
    assert picture_clip == pytest.approx(k * clip, rel=0.05), (mid, k)
    mapped = segment.amplitude_to_gray(picture, picture_clip, report["zero"])
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
  source = segment.in_memory_input(deep, "picture16.npy")
  picture_clip, report = segment.choose_clip(source, segment.scan_input(source), segment, stats)
  assert report["zero"] == pytest.approx((np.median(amplitude) - lo) * k, abs=1.0)
  assert picture_clip == pytest.approx(k * clip, rel=0.01)
  # Floats that are never negative (a picture read into [0, 1]): a picture too.
  unit = ((amplitude - lo) / (hi - lo)).astype(np.float32)
  source = segment.in_memory_input(unit, "picture01.npy")
  picture_clip, report = segment.choose_clip(source, segment.scan_input(source), segment, stats)
  assert report["zero"] == pytest.approx((np.median(amplitude) - lo) / (hi - lo), abs=1e-6)
  assert picture_clip == pytest.approx(clip / (hi - lo), rel=0.01)
  # 'as_is' is for 8-bit pictures only.
  segment.amplitude = "as_is"
  for name, values in (("amplitudes.npy", amplitude), ("picture16.npy", deep)):
    source = segment.in_memory_input(values, name)
    with pytest.raises(segment.DataError, match=rf"{name}: .*amplitude='as_is'"):
      segment.choose_clip(source, segment.scan_input(source), segment, stats)


def _ricker_section(rng, frequency, samples=256, traces=300):
  """Sparse Laplace reflectivity (white) convolved down the traces with a Ricker
  wavelet of peak `frequency` cycles/sample: drawn here, not by saltjax.data.synthetic."""
  spikes = rng.laplace(size=(samples, traces)) * (rng.random((samples, traces)) < 0.3)
  t = np.arange(-60, 61)
  a = (np.pi * frequency * t) ** 2
  wavelet = ((1 - 2 * a) * np.exp(-a)).astype(np.float32)
  return cv2.filter2D(spikes.astype(np.float32), -1, wavelet[:, None])


def test_vertical_period_is_the_first_zero_of_the_wavelets_autocorrelation():
  from saltjax.data import gray_stats

  # White reflectivity: the traces' autocorrelation is the wavelet's.  A
  # Ricker wavelet's power spectrum is f^4 exp(-2 f^2 / fp^2), whose Fourier
  # transform is He4(x) exp(-x^2 / 2) with x = pi fp tau: its first zero is at
  # x^2 = 3 - sqrt(6), tau = sqrt(3 - sqrt(6)) / (pi fp) = 0.2362 / fp samples.
  # (Above 0.1 cycles/sample the zero falls between lags 1 and 2, and linear
  # interpolation between them is off by a few %: the tiles' periods are
  # measured the same way, so the comparison stays fair.)
  rng = np.random.default_rng(0)
  for fp in (0.025, 0.05, 0.1):
    section = _ricker_section(rng, fp)
    want = np.sqrt(3 - np.sqrt(6)) / (np.pi * fp)
    assert gray_stats.vertical_period(section) == pytest.approx(want, rel=0.04), fp
    # Neither the amplitude scale, an offset nor white noise moves it (the
    # noise adds to lag 0 only).
    noisy = 1e3 * section + 7.0 + 0.5 * section.std() * rng.standard_normal(section.shape)
    assert gray_stats.vertical_period(noisy) == pytest.approx(want, rel=0.04), fp
    # Flat runs are left out: a muted top (zeros under data with an offset) and a
    # band of 3 rows of one value along the bottom edge.
    muted = section + 5 * section.std()
    muted[:40], muted[-3:] = 0.0, -1.0
    assert gray_stats.vertical_period(muted) == pytest.approx(want, rel=0.04), fp
    # A few samples 1000x the rest (spikes on 1 % of the traces) are clipped.
    spiked = section.copy()
    spiked[100, ::100] = 1000 * np.abs(section).max()
    assert gray_stats.vertical_period(spiked) == pytest.approx(want, rel=0.04), fp
  # A cosine of period 12 down every trace: its autocorrelation is a cosine too,
  # with its first zero a quarter period down.
  phase = rng.uniform(0, 2 * np.pi, 200)
  cosine = np.cos(2 * np.pi * np.arange(400)[:, None] / 12 + phase)
  assert gray_stats.vertical_period(cosine) == pytest.approx(3.0, abs=0.05)
  assert np.isnan(gray_stats.vertical_period(np.full((50, 20), 3.0)))  # no energy


def _period_stats():
  """Training statistics whose tiles' vertical periods have percentiles 20 and 80
  at 2.2 and 2.8 pixels."""
  from saltjax.data import gray_stats

  periods = dict(zip((5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99), np.linspace(1.8, 3.3, 12)))
  periods.update({10: 2.0, 20: 2.2, 80: 2.8, 90: 3.0})
  return {"vertical_period": [periods[q] for q in gray_stats.PERCENTILES]}


def test_choose_scale_brings_a_finer_or_coarser_section_into_the_tiles_range():
  import types

  stats = _period_stats()
  auto = types.SimpleNamespace(scale_samples=-1, scale_traces=-1)
  rng = np.random.default_rng(1)

  def choose(section, segment=auto, stats=stats):
    scan = segment.scan_input(segment.in_memory_input(section))
    return segment.choose_scale(scan, segment, stats, "test stats")

  # Period 0.2362 / 0.1 = 2.36 pixels: within percentiles 20-80, left alone.
  usual = _ricker_section(rng, 0.1)
  (samples, traces), report = choose(usual)
  assert (samples, traces) == (1.0, 1.0)
  assert report["vertical_period"]["section"] == pytest.approx(2.362, rel=0.04)
  # Twice as finely sampled (period 4.72): brought to percentile 80, 2.8 pixels;
  # the traces follow.  1.5 times as coarsely (1.57): up to percentile 20, 2.2.
  for fp, edge in ((0.05, 2.8), (0.15, 2.2)):
    section = _ricker_section(rng, fp)
    (samples, traces), report = choose(section)
    period = report["vertical_period"]["section"]
    assert samples == traces == pytest.approx(edge / period, abs=1e-3), fp
    assert samples == pytest.approx(edge * fp / 0.2362, rel=0.05), fp
  # Continuous at the range's edge: periods 2.19 and 2.21 (autocorrelations
  # falling linearly to 0 there) are resampled by 2.2 / 2.19 and left alone.
  for period, want in ((2.19, 2.2 / 2.19), (2.21, 1.0)):
    falling = 1.0 - np.arange(50) / period
    scan = segment.Scan((50, 50), np.ones(1), (np.ones(1), np.ones(1)), autocorrelation=falling)
    assert segment.choose_scale(scan, auto, stats)[0][0] == pytest.approx(want, abs=1e-3)
  # Given factors are kept; scale_traces may follow a given scale_samples.
  given = types.SimpleNamespace(scale_samples=0.5, scale_traces=-1)
  assert choose(section, given)[0] == (0.5, 0.5)
  given = types.SimpleNamespace(scale_samples=-1, scale_traces=1.0)
  assert choose(usual, given)[0] == (1.0, 1.0)
  # Without the tiles' periods, or a period of the section's: 1, saying why.
  (samples, traces), report = choose(section, stats=None)
  assert (samples, traces) == (1.0, 1.0) and "test stats" in report["fallback"]
  (samples, _), report = choose(np.ones((150, 120), np.float32))
  assert samples == 1.0 and "has no zero" in report["fallback"]
  # A trend, not a section sampled otherwise: a period of ~45 pixels would
  # mean resampling by 1/20.
  (samples, _), report = choose(np.tile(np.linspace(-1, 1, 150)[:, None], (1, 120)))
  assert samples == 1.0 and "too far from the training tiles'" in report["fallback"]


def test_truth_scores_agree_with_a_hand_computation():
  # A 101 x 202 section is two tiles side by side.  Left: true salt in rows
  # 0-49 (5050 px), predicted in rows 0-39 (4040 px): IoU 0.8, which passes
  # the thresholds 0.50 ... 0.75 (6 of 10): tile score 0.6.  Right: no salt,
  # one false pixel: tile score 0.  Pixels: tp 4040, fp 1, fn 1010.
  truth = np.zeros((101, 202), np.uint8)
  truth[:50, :101] = 1
  pred = np.zeros_like(truth)
  pred[:40, :101] = 1
  pred[7, 150] = 1
  scores = segment.truth_scores(truth, pred)
  assert scores["tiles"] == 2
  assert scores["competition_score"] == pytest.approx(0.3)
  assert scores["iou"] == pytest.approx(4040 / 5051)
  assert scores["precision"] == pytest.approx(4040 / 4041)
  assert scores["recall"] == pytest.approx(0.8)
  # Nothing predicted and nothing true: IoU 1, every tile scores 1, no precision/recall.
  empty = segment.truth_scores(np.zeros((150, 150)), np.zeros((150, 150)))
  assert empty["iou"] == 1.0 and empty["competition_score"] == 1.0 and empty["tiles"] == 4
  assert empty["precision"] is None and empty["recall"] is None


def test_line_numbers_parse():
  assert segment.parse_line_numbers("", "inlines") is None
  assert segment.parse_line_numbers("3, 5-7,3", "inlines") == [3, 5, 6, 7]
  with pytest.raises(Exception, match="config.segment.inlines='5-x'"):
    segment.parse_line_numbers("5-x", "inlines")


# --------------------------------------------------- with a trained model ---


def test_segy_line_is_segmented_and_its_headers_round_trip(trained, tmp_path, compile_cache):
  path = tmp_path / "line_a.sgy"
  _, truth = _segy_line(path, seed=11)
  assert _run(_segment_config(compile_cache, path), trained) == 0
  out = trained / "sections"
  names = {p.name for p in out.iterdir()}
  assert {
      "line_a_probability.npy",
      "line_a_mask.npy",
      "line_a_probability.png",
      "line_a_mask.png",
      "line_a_overlay.png",
      "line_a_probability.sgy",
      "line_a_segment.json",
  } <= names
  assert not [n for n in names if ".tmp" in n]
  prob = np.load(out / "line_a_probability.npy")
  mask = np.load(out / "line_a_mask.npy")
  summary = json.loads((out / "line_a_segment.json").read_text())
  scores = json.loads((trained / "scores.json").read_text())
  assert prob.shape == mask.shape == (ROWS, COLS)
  assert summary["threshold"] == scores["threshold"]
  assert summary["min_area"] == scores["min_area"]

  # The mask finds the known salt body: far better than chance, i.e. than
  # calling everything salt (IoU = the salt fraction) or a random mask of the
  # right size (IoU about fraction / (2 - fraction)).
  iou = _iou(mask, truth)
  fraction = truth.mean()
  assert 0.15 < fraction < 0.4
  assert iou > max(0.6, fraction + 0.3), (iou, fraction)

  # PNGs: the section's size; the mask PNG is the mask, the probability PNG its 8-bit image.
  for what in ("probability", "mask", "overlay"):
    image = cv2.imread(str(out / f"line_a_{what}.png"), cv2.IMREAD_UNCHANGED)
    assert image.shape[:2] == (ROWS, COLS)
  np.testing.assert_array_equal(
      cv2.imread(str(out / "line_a_mask.png"), cv2.IMREAD_UNCHANGED) > 0, mask > 0
  )

  # The SEG-Y copy: same text, binary and trace headers; samples are the probability.
  with segyio.open(str(path), ignore_geometry=True) as src, segyio.open(
      str(out / "line_a_probability.sgy"), ignore_geometry=True
  ) as dst:
    assert dst.tracecount == src.tracecount == COLS
    np.testing.assert_array_equal(dst.samples, src.samples)
    assert dst.text[0] == src.text[0]
    assert dict(dst.bin) == dict(src.bin)
    for i in range(src.tracecount):
      assert dict(dst.header[i]) == dict(src.header[i])
    np.testing.assert_allclose(dst.trace.raw[:], prob.T, atol=1e-7)


def test_default_rule_gives_the_same_mask_at_any_scale_and_scores_it(
    trained, tmp_path, compile_cache
):
  """Sections whose amplitudes differ from the training tiles' in scale and in contrast."""
  amplitude, truth = synthetic.generate_section(11, ROWS, COLS)
  np.save(tmp_path / "truth.npy", truth)
  cv2.imwrite(str(tmp_path / "truth.png"), truth * 255)
  # A reflector 30x the sediments' peak over 2% of the samples: it alone sets
  # the 99th percentile of |a|.
  strong = amplitude.copy()
  band = slice(40, 45)
  strong[band] = 30 * np.abs(amplitude).max() * np.sign(amplitude[band] + 1e-9)
  inputs = {
      "x0.01": 0.01 * amplitude,
      "x1": amplitude,
      "x1000": 1000.0 * amplitude,
      "strong": strong,
  }
  masks, summaries = {}, {}
  for name, values in inputs.items():
    path = tmp_path / f"scaled_{name.replace('.', '_')}.npy"
    np.save(path, values.astype(np.float32))
    truth_file = tmp_path / ("truth.png" if name == "strong" else "truth.npy")
    assert _run(_segment_config(compile_cache, path, truth=str(truth_file)), trained) == 0
    masks[name] = np.load(trained / "sections" / f"{path.stem}_mask.npy").astype(bool)
    summaries[name] = json.loads((trained / "sections" / f"{path.stem}_segment.json").read_text())

  reference = masks["x1"]
  for name in ("x0.01", "x1000"):
    assert (masks[name] != reference).mean() < 0.005, name
    assert summaries[name]["amplitude_rule"] == "match_training"
    scale = float(name[1:])
    assert summaries[name]["clip_level"] / scale == pytest.approx(
        summaries["x1"]["clip_level"], rel=1e-3
    )
  away = np.ones(reference.shape, bool)
  away[30:55] = False  # the reflector and the tiles' blur of it
  assert (masks["strong"][away] != reference[away]).mean() < 0.03
  # The body the generator drew is found.
  for name, mask in masks.items():
    assert _iou(mask, truth) >= 0.7, (name, _iou(mask, truth))

  # The scores in the summary are those of the mask against the truth file.
  for name, summary in summaries.items():
    mask = masks[name]
    tp, fp, fn = (
        (mask & (truth > 0)).sum(),
        (mask & (truth == 0)).sum(),
        (~mask & (truth > 0)).sum(),
    )
    for scores in (summary["truth"]["per_line"]["line"], summary["truth"]["overall"]):
      assert scores["iou"] == pytest.approx(_iou(mask, truth))
      assert scores["precision"] == pytest.approx(tp / (tp + fp))
      assert scores["recall"] == pytest.approx(tp / (tp + fn))
      assert scores["tiles"] == 3 * 4  # 101-pixel tiles at 0, 101, 149 (rows) x 0, 101, 202, 299
      assert 0 <= scores["competition_score"] <= 1

  # The old default, the 99th percentile of |a|, is set by the reflector: the
  # sediments come out flat gray and the mask is far worse.
  path = tmp_path / "scaled_strong.npy"
  assert _run(_segment_config(compile_cache, path, amplitude="percentile"), trained) == 0
  summary = json.loads((trained / "sections" / "scaled_strong_segment.json").read_text())
  assert summary["amplitude_rule"] == "percentile"
  assert summary["clip_level"] > 10 * summaries["strong"]["clip_level"]
  assert _iou(np.load(trained / "sections" / "scaled_strong_mask.npy"), truth) < 0.5


def test_older_workdir_gets_gray_levels_from_its_training_data_or_falls_back(
    trained, tmp_path, compile_cache, caplog
):
  import shutil

  workdir = tmp_path / "old"
  shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("sections", ".lock"))
  recorded = json.loads((workdir / "gray_levels.json").read_text())
  # A workdir of an earlier version recorded no vertical period: measured again.
  older = {k: v for k, v in recorded.items() if k != "vertical_period"}
  (workdir / "gray_levels.json").write_text(json.dumps(older))
  amplitude, _ = synthetic.generate_section(12, 150, 200)
  np.save(tmp_path / "old.npy", amplitude)
  assert _run(_segment_config(compile_cache, tmp_path / "old.npy"), workdir) == 0
  summary = json.loads((workdir / "sections" / "old_segment.json").read_text())
  assert summary["amplitude_rule"] == "match_training"
  assert "computed from the training images" in summary["amplitude"]["training_gray_levels"]
  again = json.loads((workdir / "gray_levels.json").read_text())
  assert again["deviation"] == recorded["deviation"]
  assert again["vertical_period"] == recorded["vertical_period"]
  assert summary["scale"]["vertical_period"]["training_gray_levels"].startswith("computed from")

  # Training data that cannot be read: the percentile rule, with a warning.
  (workdir / "gray_levels.json").unlink()
  empty = tmp_path / "no_tiles"
  empty.mkdir()
  config = json.loads((workdir / "config.json").read_text())
  config["data_dir"] = str(empty)
  (workdir / "config.json").write_text(json.dumps(config))
  caplog.clear()
  with caplog.at_level("WARNING"):
    assert _run(_segment_config(compile_cache, tmp_path / "old.npy"), workdir) == 0
  summary = json.loads((workdir / "sections" / "old_segment.json").read_text())
  assert summary["amplitude_rule"] == "percentile"
  assert "gray_levels.json is missing" in summary["amplitude"]["fallback"]
  assert summary["clip_level"] == pytest.approx(segment.clip_level(amplitude, 99), rel=1e-6)
  assert any("99th percentile" in r.getMessage() for r in caplog.records)
  assert summary["scale"]["samples"] == summary["scale"]["traces"] == 1.0
  assert "gray_levels.json is missing" in summary["scale"]["fallback"]
  assert any("scale_samples=-1" in r.getMessage() for r in caplog.records)


def _jumps(prob, axis):
  """Mean |difference| between neighbouring columns (axis 1) or rows (axis 0)."""
  return np.abs(np.diff(prob, axis=axis)).mean(axis=1 - axis)


def _seam_ratio(prob, starts_rows, starts_cols):
  """How much larger the jumps across tile borders are than the jumps elsewhere.

  Entry k of _jumps(.., axis) is the step between pixels k and k+1; a tile
  starting at s (or ending at s + 100) puts a border between s-1 and s (or
  s+100 and s+101).  The ratio is the largest border step over the 95th
  percentile of the other steps, per axis.
  """
  ratios = []
  for axis, starts, length in ((0, starts_rows, prob.shape[0]), (1, starts_cols, prob.shape[1])):
    jumps = _jumps(prob, axis)
    borders = {s - 1 for s in starts if s > 0} | {s + 100 for s in starts if s + 101 < length}
    border = np.array(sorted(borders))
    others = np.delete(jumps, border)
    ratios.append(jumps[border].max() / np.percentile(others, 95))
  return max(ratios)


def test_blended_tiles_leave_no_seams_where_plain_tiling_does(trained, tmp_path, compile_cache):
  from saltjax.app import config_checks

  amplitude, _ = synthetic.generate_section(12, ROWS, COLS)
  config = config_checks.config_for_prediction(
      _segment_config(compile_cache, tmp_path / "unused"), trained
  )
  config.segment = _segment_config(compile_cache, tmp_path / "unused").segment
  ensemble = segment.load_ensemble(config, trained)
  gray = segment.amplitude_to_gray(amplitude, segment.clip_level(amplitude, 99))

  (blended,) = segment.segment_sections([gray], ensemble.predict_tiles, stride=50)
  ratio = _seam_ratio(blended, segment.tile_starts(ROWS, 50), segment.tile_starts(COLS, 50))
  assert ratio < 1.5, ratio

  # Side by side, non-overlapping tiles (the last one flush with the edge),
  # averaged without a window: each tile's edge shows.
  (plain,) = segment.segment_sections(
      [gray], ensemble.predict_tiles, stride=101, window=np.ones((101, 101))
  )
  plain_ratio = _seam_ratio(plain, segment.tile_starts(ROWS, 101), segment.tile_starts(COLS, 101))
  assert plain_ratio > 2.0, plain_ratio


def test_volume_gives_one_mask_per_inline_and_crosslines_on_request(
    trained, tmp_path, compile_cache
):
  truths, lines = [], []
  for seed in (21, 22, 23):
    amplitude, mask = synthetic.generate_section(seed, ROWS, COLS)
    lines.append(amplitude)
    truths.append(mask)
  path = segy.write_section(tmp_path / "cube.sgy", np.stack(lines), inlines=[100, 101, 102])
  np.save(tmp_path / "cube_truth.npy", np.stack([truths[0], truths[2]]))
  config = _segment_config(
      compile_cache, path, inlines="100,102", truth=str(tmp_path / "cube_truth.npy")
  )
  assert _run(config, trained) == 0
  out = trained / "sections"
  prob = np.load(out / "cube_probability.npy")
  mask = np.load(out / "cube_mask.npy")
  assert prob.shape == mask.shape == (2, ROWS, COLS)
  for k, inline in enumerate((100, 102)):
    for what in ("probability", "mask", "overlay"):
      assert (out / f"cube_inline{inline}_{what}.png").is_file()
    assert _iou(mask[k], truths[inline - 100]) > 0.5
  assert not (out / "cube_inline101_mask.png").exists()
  scored = json.loads((out / "cube_segment.json").read_text())["truth"]
  assert scored["per_line"]["inline 102"]["iou"] == pytest.approx(_iou(mask[1], truths[2]))
  assert scored["overall"]["iou"] == pytest.approx(_iou(mask, np.stack([truths[0], truths[2]])))
  assert scored["overall"]["tiles"] == 2 * scored["per_line"]["inline 100"]["tiles"]
  # A truth that is not one mask per segmented line is refused, naming the option.
  wrong = _segment_config(
      compile_cache, path, inlines="100", truth=str(tmp_path / "cube_truth.npy")
  )
  assert _run(wrong, trained) == 1
  # The SEG-Y copy holds the two inlines' traces with their own headers.
  with segyio.open(str(path), ignore_geometry=True) as src, segyio.open(
      str(out / "cube_probability.sgy"), ignore_geometry=True
  ) as dst:
    assert dst.tracecount == 2 * COLS
    kept = [
        i for i in range(src.tracecount) if src.header[i][segyio.TraceField.INLINE_3D] in (100, 102)
    ]
    for j, i in enumerate(kept):
      assert dict(dst.header[j]) == dict(src.header[i])
    np.testing.assert_allclose(dst.trace.raw[COLS:], prob[1].T, atol=1e-7)

  # Every inline by default: three masks, one per line, in inline order.
  assert _run(_segment_config(compile_cache, path), trained) == 0
  assert np.load(out / "cube_mask.npy").shape == (3, ROWS, COLS)
  # A crossline of a three-inline volume is 3 traces wide: smaller than a tile.
  bad = _segment_config(compile_cache, path, crosslines="5")
  assert _run(bad, trained) == 1


def test_npy_and_png_inputs_of_any_size(trained, tmp_path, compile_cache):
  amplitude, truth = synthetic.generate_section(31, 180, 333)
  np.save(tmp_path / "arr.npy", amplitude)
  assert _run(_segment_config(compile_cache, tmp_path / "arr.npy"), trained) == 0
  mask = np.load(trained / "sections" / "arr_mask.npy")
  assert mask.shape == (180, 333) and _iou(mask, truth) > 0.5
  assert not (trained / "sections" / "arr_probability.sgy").exists()
  # A PNG is a picture of the amplitudes: drawn darker or lighter, flatter or
  # harsher than the training tiles, it gives the amplitudes' mask.
  clip = json.loads((trained / "sections" / "arr_segment.json").read_text())["clip_level"]
  for name, (mid, contrast) in {"dark": (70, 40.0), "light": (190, 60.0)}.items():
    picture = np.clip(np.rint(mid + contrast * amplitude / clip), 0, 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / f"{name}.png"), picture)
    assert _run(_segment_config(compile_cache, tmp_path / f"{name}.png"), trained) == 0
    got = np.load(trained / "sections" / f"{name}_mask.npy")
    assert (got != mask).mean() < 0.01, name
    summary = json.loads((trained / "sections" / f"{name}_segment.json").read_text())
    assert summary["amplitude_rule"] == "match_training" and summary["amplitude"]["zero"] == mid
  # A 16-bit PNG stretched from the lowest to the highest amplitude.
  lo, hi = amplitude.min(), amplitude.max()
  picture = np.rint((amplitude - lo) * (65535 / (hi - lo))).astype(np.uint16)
  cv2.imwrite(str(tmp_path / "deep.png"), picture)
  assert _run(_segment_config(compile_cache, tmp_path / "deep.png"), trained) == 0
  assert (np.load(trained / "sections" / "deep_mask.npy") != mask).mean() < 0.01
  # 'as_is' gives the model the PNG's gray levels unchanged: those of the
  # amplitudes' own mapping, resampled by the same factors, give their mask exactly.
  cv2.imwrite(str(tmp_path / "pic.png"), segment.amplitude_to_gray(amplitude, clip))
  scale = json.loads((trained / "sections" / "arr_segment.json").read_text())["scale"]
  config = _segment_config(
      compile_cache,
      tmp_path / "pic.png",
      amplitude="as_is",
      scale_samples=scale["samples"],
      scale_traces=scale["traces"],
  )
  assert _run(config, trained) == 0
  np.testing.assert_array_equal(np.load(trained / "sections" / "pic_mask.npy"), mask)


# -------------------------------------------------------------- bad input ---


def _bad_inputs(tmp_path):
  """(path, text the error must contain) for each kind of bad input."""
  cases = []
  text = tmp_path / "notes.sgy"
  text.write_text("this is not seismic data\n" * 200)
  cases.append((text, "not a readable SEG-Y file"))
  good = segy.write_section(tmp_path / "whole.sgy", np.ones((150, 120), np.float32))
  data = good.read_bytes()
  truncated = tmp_path / "truncated.sgy"
  truncated.write_bytes(data[: len(data) - 301])  # cut inside the last trace
  cases.append((truncated, "not a readable SEG-Y file"))
  small = segy.write_section(tmp_path / "small.sgy", np.ones((80, 300), np.float32))
  cases.append((small, "at least 101 x 101"))
  with_nan = np.random.default_rng(0).standard_normal((150, 150)).astype(np.float32)
  with_nan[40, 70] = np.nan
  np.save(tmp_path / "nan.npy", with_nan)
  cases.append((tmp_path / "nan.npy", "NaN or infinite (the first at sample 40, trace 70)"))
  with_inf = np.random.default_rng(1).standard_normal((150, 150)).astype(np.float32)
  with_inf[3, 4] = np.inf
  cases.append((segy.write_section(tmp_path / "inf.sgy", with_inf), "NaN or infinite"))
  garbage = tmp_path / "garbage.npy"
  garbage.write_bytes(b"\x93NUMPY garbage")
  cases.append((garbage, "not a readable .npy array"))
  return cases


def test_bad_input_is_refused_naming_the_file_and_writing_nothing(
    trained, tmp_path, compile_cache, capsys
):
  before = (
      sorted(p.name for p in (trained / "sections").iterdir())
      if (trained / "sections").exists()
      else []
  )
  for path, expected in _bad_inputs(tmp_path):
    capsys.readouterr()
    assert _run(_segment_config(compile_cache, path), trained) == 1, path
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and expected in err, err
    assert "Traceback" not in err
    now = (
        sorted(p.name for p in (trained / "sections").iterdir())
        if (trained / "sections").exists()
        else []
    )
    assert now == before, path


def test_scale_segments_a_finer_section_at_the_models_sampling(
    trained, tmp_path, compile_cache, capsys
):
  """A section sampled twice as finely in depth and along the line (its layers,
  salt edges and noise twice the size in pixels) is resampled to the tiles'
  sampling, segmented there, and its outputs brought back to its own size:
  by default with factors estimated from its vertical period, or by the
  factors given."""
  amplitude, truth = synthetic.generate_section(11, ROWS, COLS)
  np.save(tmp_path / "coarse.npy", amplitude)
  assert _run(_segment_config(compile_cache, tmp_path / "coarse.npy"), trained) == 0
  coarse = np.load(trained / "sections" / "coarse_mask.npy")
  summary = json.loads((trained / "sections" / "coarse_segment.json").read_text())
  assert summary["scale"]["samples"] == summary["scale"]["traces"] == 1.0  # the tiles' sampling
  fine_size = (2 * COLS, 2 * ROWS)
  np.save(tmp_path / "fine.npy", cv2.resize(amplitude, fine_size, interpolation=cv2.INTER_CUBIC))
  fine_truth = cv2.resize(truth, fine_size, interpolation=cv2.INTER_NEAREST)
  np.save(tmp_path / "fine_truth.npy", fine_truth)
  config = _segment_config(
      compile_cache, tmp_path / "fine.npy", truth=str(tmp_path / "fine_truth.npy")
  )
  assert _run(config, trained) == 0
  summary = json.loads((trained / "sections" / "fine_segment.json").read_text())
  scale = summary["scale"]
  # Twice the period, brought back inside the tiles' range: about halved.
  period = scale["vertical_period"]
  assert period["section"] == pytest.approx(2 * _summary_period(trained, "coarse"), rel=0.05)
  assert 0.45 <= scale["samples"] == scale["traces"] <= 0.8
  assert period["section"] * scale["samples"] == pytest.approx(
      period["training_percentiles_20_80"][1], rel=0.005
  )
  assert summary["truth"]["overall"]["iou"] >= 0.7
  config = _segment_config(
      compile_cache,
      tmp_path / "fine.npy",
      scale_samples=0.5,
      scale_traces=0.5,
      truth=str(tmp_path / "fine_truth.npy"),
  )
  assert _run(config, trained) == 0
  fine = np.load(trained / "sections" / "fine_mask.npy")
  assert fine.shape == (2 * ROWS, 2 * COLS)
  # The coarse section's mask, at the fine section's size, up to the outline.
  assert (fine != cv2.resize(coarse, fine_size, interpolation=cv2.INTER_NEAREST)).mean() < 0.02
  assert _iou(fine, fine_truth) >= 0.7
  summary = json.loads((trained / "sections" / "fine_segment.json").read_text())
  assert summary["scale"]["samples"] == summary["scale"]["traces"] == 0.5
  assert summary["scale"]["model_shape"] == [ROWS, COLS]
  assert summary["scale"]["rule"].startswith("given")
  assert summary["min_area_section_pixels"] == round(4 * summary["min_area"])
  # A section too small once resampled is refused, naming the factors.
  np.save(tmp_path / "small.npy", amplitude[:150, :150])
  config = _segment_config(
      compile_cache, tmp_path / "small.npy", scale_samples=0.5, scale_traces=1.0
  )
  assert _run(config, trained) == 1
  assert "75 x 150 once resampled by config.segment.scale_samples" in capsys.readouterr().err


def _summary_period(workdir, stem):
  """The section's vertical period that <stem>_segment.json records."""
  summary = json.loads((workdir / "sections" / f"{stem}_segment.json").read_text())
  return summary["scale"]["vertical_period"]["section"]


def test_empty_or_untrained_workdir_is_refused(trained, tmp_path, compile_cache, capsys):
  line = tmp_path / "line.sgy"
  segy.write_section(line, np.random.default_rng(0).standard_normal((150, 150)))
  empty = tmp_path / "empty"
  empty.mkdir()
  assert _run(_segment_config(compile_cache, line), empty) == 1
  err = capsys.readouterr().err
  assert str(empty / "config.json") in err
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  (untrained / "config.json").write_text((trained / "config.json").read_text())
  assert _run(_segment_config(compile_cache, line), untrained) == 1
  err = capsys.readouterr().err
  assert str(untrained) in err and "no trained fold" in err
  for workdir in (empty, untrained):
    assert not (workdir / "sections").exists()


def test_main_py_segments_a_png_from_the_command_line(trained, tmp_path, compile_cache):
  amplitude, _ = synthetic.generate_section(41, 120, 150)
  cv2.imwrite(
      str(tmp_path / "cli.png"),
      segment.amplitude_to_gray(amplitude, segment.clip_level(amplitude, 99)),
  )
  result = run_main(
      [
          "--config=configs/segment.py",
          f"--workdir={trained}",
          f"--config.segment.input={tmp_path / 'cli.png'}",
          f"--config.compilation_cache={compile_cache}",
          "--config.progress=False",
          "--config.predict.tta=none",
          "--config.predict.batch_size=32",
          "--config.segment.stride=40",
      ]
  )
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((trained / "sections" / "cli_segment.json").read_text())
  assert summary["stride"] == 40 and summary["shape"] == [120, 150]
  assert pathlib.Path(trained / "sections" / "cli_overlay.png").is_file()


def test_bad_segment_config_values_are_all_named(tmp_path, compile_cache, capsys):
  config = _segment_config(
      compile_cache,
      tmp_path / "missing.sgy",
      stride=0,
      clip_percentile=0.0,
      clip_value=2.0,
      inlines="3",
      crosslines="4",
      truth=str(tmp_path / "no_truth.npy"),
      scale_samples=0.0,
      scale_traces=20.0,
  )
  assert _run(config, tmp_path / "run") == 1
  err = capsys.readouterr().err
  for text in (
      "config.segment.input=",
      "no such file",
      "config.segment.stride=0",
      "config.segment.clip_percentile=0.0",
      "config.segment.crosslines='4'",
      "config.segment.clip_value=2.0: is used only with config.segment.amplitude='value'",
      "config.segment.truth=",
      "config.segment.scale_samples=0.0: must be a factor in (0, 8]",
      "config.segment.scale_traces=20.0: must be a factor in (0, 8]",
  ):
    assert text in err, err
  assert not (tmp_path / "run").exists()

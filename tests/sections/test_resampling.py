"""The vertical period of a section and the scale factors it gives
(saltjax/sections/resampling.py), against Ricker wavelets computed by hand."""

import cv2
import numpy as np
import pytest

from saltjax.sections import inputs
from saltjax.sections import resampling


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
    scan = inputs.scan_input(inputs.in_memory_input(section))
    return resampling.choose_scale(scan, segment, stats, "test stats")

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
    scan = inputs.Scan((50, 50), np.ones(1), (np.ones(1), np.ones(1)), autocorrelation=falling)
    assert resampling.choose_scale(scan, auto, stats)[0][0] == pytest.approx(want, abs=1e-3)
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

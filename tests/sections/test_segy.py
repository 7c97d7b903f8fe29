"""SEG-Y writing (saltjax/sections/segy.py) apart from the segmentation around it."""

from __future__ import annotations

import numpy as np
import pytest
import segyio

from saltjax.sections import segy


def test_probability_copy_of_an_ieee_double_file_stays_ieee_double(tmp_path):
  """Format 6 (8-byte IEEE float) is written back as format 6: every sample 8 bytes,
  each float32 probability held exactly, headers as in the input."""
  n_traces, n_samples = 5, 37
  src_path = tmp_path / "double.sgy"
  spec = segyio.spec()
  spec.samples = list(range(n_samples))
  spec.tracecount = n_traces
  spec.format = 6
  with segyio.create(str(src_path), spec) as f:
    f.bin.update(hns=n_samples, hdt=4000, format=6)
    for i in range(n_traces):
      f.header[i] = {segyio.TraceField.CDP: 10 + i, segyio.TraceField.SourceX: 100 * i}
      f.trace[i] = np.full(n_samples, 1.0 + i / 3, np.float64)
  probs = np.linspace(0.0, 1.0, n_traces * n_samples, dtype=np.float32).reshape(n_traces, -1)
  out = tmp_path / "out.sgy"
  with segy.SegyFile(src_path) as source:
    assert source.format == 6
    segy.write_probability_copy(source, out, np.arange(n_traces), lambda idx: probs[idx])
  # 3600 bytes of file headers, then per trace 240 header bytes and 8 per sample.
  assert out.stat().st_size == 3600 + n_traces * (240 + 8 * n_samples)
  with segyio.open(str(src_path), ignore_geometry=True) as src, segyio.open(
      str(out), ignore_geometry=True
  ) as dst:
    assert dst.bin[segyio.BinField.Format] == 6
    assert dst.dtype == np.float64
    for i in range(n_traces):
      assert dict(dst.header[i]) == dict(src.header[i])
    np.testing.assert_array_equal(dst.trace.raw[:], probs.astype(np.float64))


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

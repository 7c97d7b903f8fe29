"""SEG-Y writing (saltjax/sections/segy.py) apart from the segmentation around it."""

from __future__ import annotations

import numpy as np
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

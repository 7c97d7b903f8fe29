"""Cutting a section into overlapping tiles and blending their predictions back
(saltjax/sections/tiling.py); removing small salt regions (predictor.py)."""

import numpy as np
import pytest

from saltjax.sections import predictor
from saltjax.sections import tiling


def test_tiles_cover_the_section_and_blending_a_consistent_field_returns_it():
  np.testing.assert_array_equal(tiling.tile_starts(101, 50), [0])
  np.testing.assert_array_equal(tiling.tile_starts(300, 50), [0, 50, 100, 150, 199])
  np.testing.assert_array_equal(tiling.tile_starts(202, 101), [0, 101])
  with pytest.raises(ValueError):
    tiling.tile_starts(100, 50)
  window = tiling.tile_window()
  assert window.min() > 0 and window.max() <= 1
  np.testing.assert_allclose(window, window.T)
  np.testing.assert_allclose(window, window[::-1, ::-1])
  # If every tile predicts exactly the crop of one field, the blend is that field.
  rng = np.random.default_rng(0)
  field = rng.random((230, 317))
  tiles, origins = tiling.cut_tiles(field, 37)
  covered = np.zeros(field.shape, bool)
  for r, c in origins:
    covered[r : r + 101, c : c + 101] = True
  assert covered.all()
  blended = tiling.blend_tiles(tiles, origins, field.shape, window)
  np.testing.assert_allclose(blended, field, rtol=1e-6)


def test_remove_small_regions_counts_8_connected_pixels():
  mask = np.zeros((8, 8), bool)
  mask[0, 0] = mask[1, 1] = True  # one diagonal region of 2
  mask[5:8, 5:8] = True  # 9
  assert predictor.remove_small_regions(mask, 3).sum() == 9
  assert predictor.remove_small_regions(mask, 2).sum() == 11
  assert predictor.remove_small_regions(mask, 10).sum() == 0

"""Tests for the synthetic TGS Salt stand-in's renderer (saltjax.data.synthetic)."""

from __future__ import annotations

import cv2
import numpy as np

from saltjax.data import synthetic

# Coverage class counts of the 4,000 real competition training masks, as
# published with the data (class 0 is empty; class i covers
# (i-1)/10 < coverage <= i/10).  Written out here, not imported, so that the
# generator is checked against the independent truth.
REAL_CLASS_COUNTS = np.array([1562, 576, 296, 224, 186, 225, 205, 174, 148, 159, 245])
REAL_CLASS_SHARES = REAL_CLASS_COUNTS / REAL_CLASS_COUNTS.sum()


def _coverage_classes(masks: np.ndarray) -> np.ndarray:
  # Independent of saltjax.metrics: class = ceil(10 * pixels / 10201).
  pixels = masks.reshape(len(masks), -1).astype(bool).sum(1)
  return np.ceil(10 * pixels / masks[0].size).astype(int)


def test_generate_example_contract():
  image, mask, depth = synthetic.generate_example(np.random.default_rng(3))
  assert image.shape == mask.shape == (101, 101)
  assert image.dtype == mask.dtype == np.uint8
  assert set(np.unique(mask)) <= {0, 1}
  assert isinstance(depth, int) and 50 <= depth < 960
  again = synthetic.generate_example(np.random.default_rng(3))
  np.testing.assert_array_equal(image, again[0])
  np.testing.assert_array_equal(mask, again[1])
  assert depth == again[2]


def test_mask_statistics_match_the_real_labels():
  masks = np.stack([synthetic.generate_mask(np.random.default_rng([123, i])) for i in range(2000)])
  assert masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
  shares = np.bincount(_coverage_classes(masks), minlength=11) / len(masks)
  assert abs(shares[0] - 0.3905) < 0.04
  # About four standard errors of a share estimated from 2,000 masks.
  tolerance = 4 * np.sqrt(REAL_CLASS_SHARES * (1 - REAL_CLASS_SHARES) / 2000)
  np.testing.assert_array_less(np.abs(shares - REAL_CLASS_SHARES), tolerance)

  salt = masks[masks.reshape(len(masks), -1).any(1)]
  pixels = salt.reshape(len(salt), -1).sum(1)
  # Tiny masks exist (real: smallest 1 pixel, ~1% of all under 10 pixels).
  assert pixels.min() <= 5
  assert 0.002 < (pixels < 10).sum() / len(masks) < 0.03
  # Real masks nearly all touch the border (99.6%) and are mostly one
  # connected component (92%).
  touches = salt[:, 0].any(1) | salt[:, -1].any(1) | salt[:, :, 0].any(1) | salt[:, :, -1].any(1)
  assert touches.mean() > 0.95
  components = np.array([cv2.connectedComponents(m, connectivity=8)[0] - 1 for m in salt])
  assert (components == 1).mean() > 0.85


def test_images_need_texture_not_brightness():
  differences, stds, means, inside_std, outside_std = [], [], [], [], []
  for i in range(150):
    image, mask, _ = synthetic.generate_example(np.random.default_rng([77, i]))
    image = image.astype(np.float64)
    stds.append(image.std())
    means.append(image.mean())
    salt = mask.astype(bool)
    if 100 < salt.sum() < salt.size - 100:
      differences.append(image[salt].mean() - image[~salt].mean())
      inside_std.append(image[salt].std())
      outside_std.append(image[~salt].std())
  assert len(differences) > 40
  # Salt is not brighter or darker than the sediments on average.
  assert abs(np.mean(differences)) < 3.0
  assert np.median(np.abs(differences)) < 8.0
  # Realistic gray levels and contrast (real: mean ~120, wide spread).
  assert 105 < np.mean(means) < 135
  assert np.mean(stds) > 10 and np.percentile(stds, 90) > 30
  # Inside the salt the reflectivity is weak and chaotic.
  assert np.mean(inside_std) < np.mean(outside_std)

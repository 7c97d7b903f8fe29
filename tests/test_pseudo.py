import numpy as np
import pytest

from saltjax import pseudo


def test_selects_images_outside_the_band():
  probs = np.full((3, 101, 101), 0.05, np.float32)
  probs[0, :10] = 0.95  # confident salt
  probs[1, :10] = 0.5  # 1010 uncertain pixels (~10%)
  probs[2, 0, :5] = 0.5  # 5 uncertain pixels (0.05%)
  chosen, masks = pseudo.select(probs, 0.2, 0.8, max_uncertain_fraction=0.001)
  assert chosen.tolist() == [0, 2]
  assert masks[0].sum() == 1010 and masks[1].sum() == 0


def test_bad_band():
  with pytest.raises(ValueError, match="band"):
    pseudo.select(np.zeros((1, 2, 2)), 0.8, 0.2, 0.0)

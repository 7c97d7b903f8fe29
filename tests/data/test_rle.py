"""RLE against hand-worked cases of the Kaggle format, and round trips."""

import numpy as np
import pytest

from saltjax.data import rle


def test_column_major_one_indexed_hand_case():
  # 3x3 mask; pixels are numbered down the columns:
  #   1 4 7
  #   2 5 8
  #   3 6 9
  mask = np.array([[0, 1, 0], [1, 1, 0], [1, 0, 1]])
  # salt at 2,3 (column 0), 4,5 (column 1), 9 (column 2): runs 2-5 and 9.
  assert rle.encode(mask) == "2 4 9 1"
  np.testing.assert_array_equal(rle.decode("2 4 9 1", (3, 3)), mask)


def test_empty_and_full():
  assert rle.encode(np.zeros((101, 101))) == ""
  assert rle.encode(np.ones((101, 101))) == "1 10201"
  assert rle.decode("", (101, 101)).sum() == 0
  assert rle.decode(float("nan"), (101, 101)).sum() == 0  # pandas' empty cell
  assert rle.decode("1 10201").all()


def test_any_nonzero_is_salt():
  mask = np.array([[0, 65535], [255, 0]], np.uint16)
  assert rle.encode(mask) == "2 2"


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_random(seed):
  rng = np.random.default_rng(seed)
  mask = (rng.random((101, 101)) < rng.random()).astype(np.uint8)
  np.testing.assert_array_equal(rle.decode(rle.encode(mask)), mask)


def test_non_square_shape_is_height_then_width():
  mask = np.zeros((2, 3), np.uint8)
  mask[1, 2] = 1  # last pixel in column-major order of 6
  assert rle.encode(mask) == "6 1"
  np.testing.assert_array_equal(rle.decode("6 1", (2, 3)), mask)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("1 2 3", "odd number"),
        ("a 2", "non-integer"),
        ("0 2", ">= 1"),
        ("5 0", ">= 1"),
        ("10200 5", "past the"),
        ("10 5 12 1", "overlap"),
        ("20 1 10 1", "out of order"),
    ],
)
def test_malformed(bad, message):
  with pytest.raises(rle.RLEError, match=message):
    rle.decode(bad, (101, 101))

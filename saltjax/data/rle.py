"""Run-length encoding of masks in the Kaggle TGS format.

Pixels are numbered from 1, top to bottom then left to right (column-major),
and a mask is written as space-separated ``start length`` pairs; an empty mask
is the empty string.
"""

from __future__ import annotations

import numpy as np


class RLEError(ValueError):
  """A run-length string that is malformed or does not fit the image."""


def encode(mask: np.ndarray) -> str:
  """Encodes a 2-D mask (any nonzero value is salt) as a Kaggle RLE string."""
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"encode expects a 2-D mask, got shape {mask.shape}")
  pixels = np.concatenate([[0], (mask.T.reshape(-1) != 0).astype(np.int8), [0]])
  edges = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1  # 1-indexed run edges
  starts, ends = edges[0::2], edges[1::2]
  return " ".join(f"{s} {e - s}" for s, e in zip(starts, ends))


def decode(rle: str, shape: tuple[int, int] = (101, 101)) -> np.ndarray:
  """Decodes a Kaggle RLE string into a uint8 {0, 1} mask of ``shape``.

  Raises RLEError when the string is not pairs of positive integers, when runs
  leave the image, or when runs overlap or are out of order.
  """
  if rle is None or (isinstance(rle, float) and np.isnan(rle)):
    rle = ""
  rle = str(rle).strip()
  height, width = shape
  flat = np.zeros(height * width, np.uint8)
  if not rle:
    return flat.reshape(width, height).T
  tokens = rle.split()
  if len(tokens) % 2:
    raise RLEError(f"odd number of values ({len(tokens)}) in RLE {rle[:40]!r}")
  try:
    numbers = np.array([int(t) for t in tokens], np.int64)
  except ValueError as e:
    raise RLEError(f"non-integer value in RLE {rle[:40]!r}") from e
  starts, lengths = numbers[0::2], numbers[1::2]
  if (starts < 1).any() or (lengths < 1).any():
    raise RLEError(f"RLE starts and lengths must be >= 1 in {rle[:40]!r}")
  ends = starts - 1 + lengths
  if (ends > flat.size).any():
    raise RLEError(
        f"RLE run ends at pixel {int(ends.max())}, past the {height}x{width}"
        f" image ({flat.size} pixels)"
    )
  if (starts[1:] <= ends[:-1]).any():
    raise RLEError(f"RLE runs overlap or are out of order in {rle[:40]!r}")
  for s, e in zip(starts - 1, ends):
    flat[s:e] = 1
  return flat.reshape(width, height).T

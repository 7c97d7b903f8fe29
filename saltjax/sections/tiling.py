"""Overlapping 101x101 tiles of a section, and their predictions blended back into one.

Tiles are cut every `stride` pixels (the last of a row or column flush with
the section's edge); their salt probabilities are averaged at every pixel
under a window that falls to almost 0 at a tile's border, so no seam shows.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

TILE = 101


def tile_starts(length: int, stride: int, tile: int = TILE) -> np.ndarray:
  """Tile origins along one axis: every `stride`, the last flush with the end."""
  if length < tile:
    raise ValueError(f"a section of {length} samples is shorter than a tile ({tile})")
  starts = list(range(0, length - tile + 1, stride))
  if starts[-1] != length - tile:
    starts.append(length - tile)
  return np.array(starts, np.int64)


def tile_window(tile: int = TILE) -> np.ndarray:
  """(tile, tile) blending weights: a product of sin^2 tapers, > 0 everywhere.

  The weight is about 1 in the tile's middle and about 2e-4 on its border, so
  a tile's prediction fades out before its edge (where a CNN sees least
  context) and the neighbouring tiles, whose middles cover that place, take
  over continuously.  It never reaches 0, so pixels that only one tile covers
  (at the section's edges) keep that tile's value exactly.
  """
  taper = np.sin(np.pi * (np.arange(tile) + 0.5) / tile) ** 2
  return np.outer(taper, taper)


def cut_tiles(section: np.ndarray, stride: int, tile: int = TILE) -> tuple[np.ndarray, np.ndarray]:
  """Overlapping tiles of a (rows, cols) section: (N, tile, tile) and origins (N, 2)."""
  rows, cols = tile_starts(section.shape[0], stride, tile), tile_starts(
      section.shape[1], stride, tile
  )
  origins = np.array([(r, c) for r in rows for c in cols], np.int64)
  tiles = np.stack([section[r : r + tile, c : c + tile] for r, c in origins])
  return tiles, origins


def blend_tiles(
    tile_probs: np.ndarray, origins: np.ndarray, shape: tuple[int, int], window: np.ndarray | None
) -> np.ndarray:
  """The weighted mean of overlapping tile predictions at every pixel.

  window=None weights every pixel of every tile equally (a plain average).
  """
  tile = tile_probs.shape[-1]
  weight = np.ones((tile, tile)) if window is None else window
  total = np.zeros(shape, np.float64)
  norm = np.zeros(shape, np.float64)
  for p, (r, c) in zip(tile_probs, origins):
    total[r : r + tile, c : c + tile] += weight * p
    norm[r : r + tile, c : c + tile] += weight
  return (total / norm).astype(np.float32)


def segment_sections(
    gray_sections: Sequence[np.ndarray],
    predict_tiles: Callable,
    stride: int,
    window: np.ndarray | None = None,
) -> list[np.ndarray]:
  """Blended salt probabilities of uint8 (rows, cols) sections, predicted together.

  predict_tiles: uint8 (N, 101, 101) tiles -> float (N, 101, 101) probabilities.
  """
  window = tile_window() if window is None else window
  cut = [cut_tiles(g, stride) for g in gray_sections]
  probs = predict_tiles(np.concatenate([tiles for tiles, _ in cut]))
  out, start = [], 0
  for g, (tiles, origins) in zip(gray_sections, cut):
    out.append(blend_tiles(probs[start : start + len(tiles)], origins, g.shape, window))
    start += len(tiles)
  return out

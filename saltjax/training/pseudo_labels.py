"""Pseudo-labelling: confident test predictions as extra training data.

After a first round, test images whose predicted pixels are (almost) all
outside an uncertainty band such as [0.2, 0.8] are taken as training
examples, labelled with their thresholded prediction, for a second round.
They only ever join the training side of each fold, never its validation,
so the second round's out-of-fold score stays honest.
"""

from __future__ import annotations

import numpy as np


def select(
    probs: np.ndarray, low: float, high: float, max_uncertain_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
  """Indices of confident images and their {0,1} masks.

  An image is confident when at most `max_uncertain_fraction` of its pixels
  have probability inside [low, high].
  """
  if not 0 <= low < high <= 1:
    raise ValueError(f"pseudo-label band [{low}, {high}] must satisfy 0 <= low < high <= 1")
  probs = np.asarray(probs)
  uncertain = ((probs >= low) & (probs <= high)).reshape(len(probs), -1).mean(1)
  chosen = np.flatnonzero(uncertain <= max_uncertain_fraction)
  return chosen, (probs[chosen] > 0.5).astype(np.uint8)

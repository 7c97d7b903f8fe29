"""Masks from probabilities, and the post-processing tuned on the out-of-fold predictions.

A mask is the probability above the threshold, emptied when it covers fewer
than the minimum area (or when the classifier's salt probability is below
the gate); `tune` chooses each of them by maximising the competition metric.
"""

from __future__ import annotations

import numpy as np

from saltjax import metrics

THRESHOLDS = np.round(np.arange(0.20, 0.805, 0.02), 2)
MIN_AREAS = (0, 5, 10, 20, 40, 80, 150, 300)
GATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def apply_postprocessing(
    probs: np.ndarray,
    threshold: float,
    min_area: int,
    class_probs: np.ndarray | None = None,
    gate: float = 0.0,
) -> np.ndarray:
  """Binary masks: threshold, then empty masks below min_area or the gate."""
  masks = probs > threshold
  empty = masks.reshape(len(masks), -1).sum(1) < max(min_area, 1)
  if class_probs is not None:
    empty |= class_probs < gate
  masks[empty] = False
  return masks


def tune(truth: np.ndarray, probs: np.ndarray, class_probs: np.ndarray | None, config) -> dict:
  """Threshold, then min area, then gate, each maximising the OOF metric."""
  p = config.predict
  sweep = [(float(t), metrics.competition_score(truth, probs > t)) for t in THRESHOLDS]
  threshold = p.threshold if p.threshold >= 0 else max(sweep, key=lambda s: s[1])[0]
  if p.min_area >= 0:
    min_area = int(p.min_area)
  else:
    scores = [
        (a, metrics.competition_score(truth, apply_postprocessing(probs, threshold, a)))
        for a in MIN_AREAS
    ]
    min_area = max(scores, key=lambda s: (s[1], -s[0]))[0]
  gate = 0.0
  if class_probs is not None and p.classifier_gate:
    scores = [
        (
            g,
            metrics.competition_score(
                truth, apply_postprocessing(probs, threshold, min_area, class_probs, g)
            ),
        )
        for g in GATES
    ]
    gate = max(scores, key=lambda s: (s[1], -s[0]))[0]
  return {
      "threshold": float(threshold),
      "min_area": min_area,
      "gate": float(gate),
      "threshold_sweep": sweep,
  }

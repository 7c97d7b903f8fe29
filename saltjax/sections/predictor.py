"""The workdir's ensemble as a predictor of sections: salt probability and mask.

Every trained fold's chosen checkpoints (`saltjax.inference.ensemble`) predict
the tiles of a section resampled to the model's sampling; the blended
probability, resampled back, is thresholded and salt regions under the
minimum area are removed.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable, Sequence

import cv2
import numpy as np

from saltjax.errors import CheckpointError, ConfigError
from saltjax.inference import ensemble as ensemble_lib
from saltjax.model import unet
from saltjax.sections import resampling
from saltjax.sections import tiling
from saltjax import workdir as workdir_lib


@dataclasses.dataclass
class Ensemble:
  """The workdir's models as one tile predictor, and its post-processing."""

  predict_tiles: Callable[[np.ndarray], np.ndarray]
  models: list[str]
  threshold: float
  min_area: int
  tta: str


def load_ensemble(config, workdir: pathlib.Path) -> Ensemble:
  """Every trained fold's chosen checkpoints (config.predict.checkpoints), with TTA.

  Probabilities are averaged over a fold's checkpoints, then over folds, as
  in `saltjax.inference.predict.predict_and_submit`.
  """
  # The models behind the workdir's results (a pseudo-label round's, after
  # one), whose threshold and minimum area scores.json holds.
  models_dir = ensemble_lib.models_dir(workdir)
  usable, left_out = ensemble_lib.usable_folds(
      models_dir, config.num_folds, config.predict.checkpoints
  )
  if not usable:
    raise CheckpointError(
        f"{workdir} holds no trained fold with {config.predict.checkpoints!r} checkpoints"
        " (config.predict.checkpoints): train first (python main.py"
        " --config=configs/fold.py --workdir=...)"
    )
  ensemble_lib.warn_left_out(left_out)
  folds = sorted(usable)
  threshold, min_area = _postprocessing(config, workdir)
  model = unet.create_model(config.model)
  members, names = [], []
  for fold in folds:
    fold_dir = workdir_lib.fold_dir(models_dir, fold)
    chosen = usable[fold]
    for store, step in chosen:
      members.append(
          (
              ensemble_lib.load_variables(config, model, fold_dir, store, step),
              1.0 / (len(chosen) * len(folds)),
          )
      )
      names.append(str(fold_dir.relative_to(workdir) / store / str(step)))
  return Ensemble(
      ensemble_lib.tile_predictor(config, model, members),
      names,
      threshold,
      min_area,
      config.predict.tta,
  )


def _postprocessing(config, workdir: pathlib.Path) -> tuple[float, int]:
  """(threshold, min_area): the config's when set, else scores.json's."""
  s = config.segment
  if s.threshold >= 0 and s.min_area >= 0:
    return float(s.threshold), int(s.min_area)
  scores_path = workdir / workdir_lib.SCORES_JSON
  if not scores_path.is_file():
    raise ConfigError(
        f"{scores_path} not found: the tuned threshold and minimum area come from a"
        f" prediction run (python main.py --config=configs/predict.py --workdir={workdir}),"
        " or set --config.segment.threshold and --config.segment.min_area"
    )
  try:
    scores = json.loads(scores_path.read_text())
    tuned = float(scores["threshold"]), int(scores["min_area"])
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(
        f"{scores_path} is unreadable or has no threshold" f" and min_area ({e})"
    ) from e
  return (
      float(s.threshold) if s.threshold >= 0 else tuned[0],
      int(s.min_area) if s.min_area >= 0 else tuned[1],
  )


def probabilities_and_masks(
    grays: Sequence[np.ndarray], ensemble: Ensemble, segment, window: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
  """(salt probability, mask) of gray sections of one shape, as `segment` makes them.

  Each is resampled to the model's sampling (segment.scale_samples /
  scale_traces), tiled every segment.stride pixels, predicted together and
  blended; the probability is resampled back to the section's size and
  thresholded, and salt regions under the minimum area removed.
  """
  shape = grays[0].shape
  resampled = resampling.model_shape(shape, segment)
  probs = tiling.segment_sections(
      [resampling.resample(g, resampled) for g in grays],
      ensemble.predict_tiles,
      segment.stride,
      window,
  )
  min_area = resampling.section_min_area(ensemble.min_area, segment)
  out = []
  for prob in probs:
    prob = resampling.resample(prob, shape)
    out.append((prob, remove_small_regions(prob > ensemble.threshold, min_area)))
  return out


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
  """Drops 8-connected salt regions of fewer than `min_area` pixels."""
  mask = np.asarray(mask, bool)
  if min_area <= 1 or not mask.any():
    return mask
  count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
  keep = stats[:, cv2.CC_STAT_AREA] >= min_area
  keep[0] = False  # background
  return keep[labels]

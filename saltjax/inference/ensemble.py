"""The workdir's fold x checkpoint ensemble: which checkpoints, their variables, the forward pass.

`predict` (held-out and test tiles) and `sections` (tiles cut from whole
sections) predict with it: the folds that hold the checkpoints
`config.predict.checkpoints` asks for (`usable_folds`), each checkpoint's
model variables (`load_variables`), and the model jitted with its TTA views
(`jitted_forward`, or `tile_predictor` for a weighted ensemble of them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from typing import Callable, Sequence

import jax
import numpy as np

from saltjax import checkpoints as ckpt_lib
from saltjax.model import tta
from saltjax.model import unet
from saltjax import parallel
from saltjax import workdir as workdir_lib


def usable_folds(
    workdir: pathlib.Path, num_folds: int, which: str
) -> tuple[dict[int, list], dict[int, str]]:
  """({fold: [(store, step)]} of the folds holding the checkpoints `which` asks for,
  {fold: why it is left out} of the others).

  A usable fold whose training never finished (no done.json: killed, or
  still running) takes part with what its run recorded, and a warning names
  it with the last epoch its resume point holds. On several hosts the choice
  is process 0's, shared with the others (`parallel.process_0_decides`): a
  host that reads the shared disk a moment earlier must not take other steps.
  """

  def decide() -> dict:
    usable, left_out = {}, {}
    for k in range(num_folds):
      fold_dir = workdir_lib.fold_dir(workdir, k)
      if not fold_dir.is_dir():
        left_out[k] = "not trained"
        continue
      chosen = ckpt_lib.model_checkpoints(fold_dir, which)
      if chosen:
        usable[k] = chosen
        if workdir_lib.read_done(workdir, k) is None:
          logging.warning("%s", unfinished_warning(workdir, k, chosen))
      else:
        left_out[k] = f"holds no {which!r} checkpoint (config.predict.checkpoints)"
    return {"usable": usable, "left_out": left_out}

  # JSON on the way between hosts: keys come back as strings, pairs as lists.
  decision = parallel.process_0_decides(decide)
  usable = {
      int(k): [(store, int(step)) for store, step in v] for k, v in decision["usable"].items()
  }
  left_out = {int(k): reason for k, reason in decision["left_out"].items()}
  return usable, left_out


def models_dir(workdir: pathlib.Path) -> pathlib.Path:
  """The directory whose fold_<k>/ hold the models behind the workdir's results.

  After a pseudo-label round the workdir's submission, oof and scores are the
  second round's (scores.json says so: `pseudo_label`), and its models are in
  workdir/pseudo_round; otherwise the workdir's own folds. Predicting or
  segmenting with the other round's models while applying these results'
  threshold would mix two rounds silently.
  """
  scores_path = workdir / workdir_lib.SCORES_JSON
  round_dir = workdir / workdir_lib.PSEUDO_ROUND
  if scores_path.is_file() and round_dir.is_dir():
    if "pseudo_label" in json.loads(scores_path.read_text()):
      return round_dir
  return workdir


def warn_left_out(left_out: dict[int, str]) -> None:
  """Names each fold `usable_folds` left out, and why."""
  for fold, reason in left_out.items():
    logging.warning("fold %d left out of the ensemble: %s", fold, reason)


def last_epoch(workdir: pathlib.Path, fold: int) -> int | None:
  """The epoch of an unfinished fold's resume point (None: it has none)."""
  point = ckpt_lib.resume_point(workdir_lib.fold_dir(workdir, fold))
  return None if point is None else point[0]


def unfinished_warning(workdir: pathlib.Path, fold: int, chosen: list) -> str:
  epoch = last_epoch(workdir, fold)
  where = (
      f"its last resume point is epoch {epoch}"
      if epoch is not None
      else "it has no resume point (killed in its first epochs)"
  )
  models = ", ".join(f"{store}/{step}" for store, step in chosen)
  return (
      f"fold {fold} never finished training (no {workdir_lib.DONE_JSON}): {where};"
      f" it predicts with {models}, a model of an unfinished run. Run the training"
      " command again to finish it"
  )


def trained_folds(
    workdir: pathlib.Path, num_folds: int, which: str = "best+snapshots"
) -> list[int]:
  """The folds of `workdir` that hold a checkpoint `which` selects."""
  return sorted(usable_folds(workdir, num_folds, which)[0])


@functools.lru_cache(maxsize=8)
def abstract_variables(model, image_size: int):
  """The shapes and dtypes of `model`'s {params, batch_stats}, traced once per
  model rather than once per checkpoint restored (an ensemble of 5 folds x 3
  snapshots would otherwise trace the ResNet50 U-Net's init 15 times)."""
  return jax.eval_shape(lambda: unet.initialized(jax.random.key(0), model, image_size))


def load_variables(config, model, fold_dir: pathlib.Path, store: str, step: int):
  abstract = abstract_variables(model, config.image_size)
  return ckpt_lib.restore_variables(fold_dir, store, step, abstract, ckpt_lib.fingerprint(config))


@dataclasses.dataclass(frozen=True)
class Forward:
  """The model jitted with config.predict.tta's views, run in batches over `mesh`."""

  infer_fn: Callable
  mesh: jax.sharding.Mesh
  batch_size: int
  progress: bool = False  # a progress bar per call (tta.progress_enabled)

  def place(self, variables):
    """A member's variables, replicated over the mesh."""
    return parallel.place_host_values(
        variables, parallel.replicated(self.mesh), "a model's weights"
    )

  def __call__(self, variables, images: np.ndarray, what: str = "") -> dict[str, np.ndarray]:
    """tta.predict_probs of uint8 (N, 101, 101) images; `what` names the progress bar."""
    return tta.predict_probs(
        self.infer_fn,
        variables,
        images,
        batch_size=self.batch_size,
        mesh=self.mesh,
        progress=what if self.progress else None,
    )


def jitted_forward(config, model, mesh, progress: bool = False) -> Forward:
  """`model`'s forward pass with TTA, once config.predict.batch_size fits the mesh."""
  parallel.check_batch_size(config.predict.batch_size, mesh, "config.predict.batch_size")
  infer_fn = _jitted_infer(model, config.image_size, config.resize_mode, config.predict.tta)
  return Forward(infer_fn, mesh, config.predict.batch_size, progress)


@functools.lru_cache(maxsize=8)
def _jitted_infer(model, image_size: int, resize_mode: str, tta_name: str) -> Callable:
  """One jitted forward per model and TTA for the process: predicting again (a
  pseudo-label round, another workdir, a section) reuses its traced programs,
  whose tracing is most of a small model's start-up. (Models are frozen
  dataclasses: equal configs give equal, hashable models.)"""
  return jax.jit(tta.make_infer_fn(model, image_size, resize_mode, tta_name))


def tile_predictor(
    config, model, members: Sequence[tuple[dict, float]]
) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 (N, 101, 101) tiles -> the weighted sum of the members' TTA probabilities.

  members: (variables, weight) pairs; the weights should sum to 1.
  """
  forward = jitted_forward(config, model, parallel.create_mesh())
  on_device = [(forward.place(variables), weight) for variables, weight in members]

  def predict_tiles(tiles: np.ndarray) -> np.ndarray:
    total = np.zeros(tiles.shape, np.float32)
    for variables, weight in on_device:
      total += weight * forward(variables, tiles)["probs"]
    return total

  return predict_tiles

"""PNG figures of a run, written into its workdir: what they share, and the training curves.

A person judging a run would rather look than read JSON: these figures show
how training went (training_curves.png, drawn here), what the out-of-fold
predictions look like at their best and worst (validation_examples.png) and
how the binarisation threshold was chosen (threshold_sweep.png), the last two
drawn by `saltjax.prediction_plots`.

Figures are drawn on `matplotlib.figure.Figure` objects directly, never through
pyplot: that needs no display and no GUI backend (the Agg renderer is used to
write the PNG), leaves the process-wide backend of a caller, such as a
notebook, untouched, and cannot leak figures into pyplot's global registry
across a long run.  Every PNG is written under a temporary name in the same
directory and renamed into place, so that a reader never sees half a file
(`save_atomic`, which every figure uses, with the resolution and the outline
colours defined here).
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Sequence

from matplotlib import figure as mfigure
from matplotlib import lines as mlines
from matplotlib import ticker as mticker
import numpy as np

from saltjax import workdir as workdir_lib

TRAINING_CURVES = "training_curves.png"

DPI = 110
TRUTH_COLOR = "#22dd44"  # green: the true mask's outline
PRED_COLOR = "#ff3030"  # red: the predicted mask's outline
# Backgrounds for successive training-loss stages (first stage unshaded).
_STAGE_SHADES = ("none", "#fff1d6", "#e3f0ff", "#f1e6ff")


# ------------------------------------------------------------------ saving ---


def save_atomic(fig: mfigure.Figure, path: pathlib.Path) -> pathlib.Path:
  """Writes fig as a PNG under a temporary name, then renames it into place."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # format= is needed: the temporary name does not end in .png.
  workdir_lib.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
  return path


# --------------------------------------------------------- training curves ---


def _fold_colors(folds: Sequence[Any]) -> dict[Any, Any]:
  palette = [f"C{i}" for i in range(10)]
  return {fold: palette[i % len(palette)] for i, fold in enumerate(folds)}


def _sort_key(fold):
  # Folds may come as ints or, after a JSON round trip, as strings.
  try:
    return (0, int(fold))
  except (TypeError, ValueError):
    return (1, str(fold))


def loss_stages(history: Sequence[Mapping]) -> list[tuple[str, int, int]]:
  """Consecutive runs of one training loss, as (loss_name, first, last) epochs."""
  stages = []
  for record in sorted(history, key=lambda r: r["epoch"]):
    name = record.get("loss_name", "")
    if stages and stages[-1][0] == name:
      stages[-1] = (name, stages[-1][1], record["epoch"])
    else:
      stages.append((name, record["epoch"], record["epoch"]))
  return stages


def write_training_curves(
    workdir, history_by_fold: Mapping[Any, Sequence[Mapping]], cycle_ends: Sequence[int] = ()
) -> pathlib.Path:
  """Writes workdir/training_curves.png: loss, validation scores and LR by epoch.

  Three stacked panels share the epoch axis: the training loss, the
  validation competition score (solid) and IoU (dashed), and the learning
  rate on a log scale, one colour per fold.  A star marks each fold's best
  validation score (the "best" checkpoint), dashed vertical lines mark the
  cosine-cycle ends (where snapshots were kept), and where the training loss
  changes (two-stage losses) the later stage is shaded and named.

  Args:
    workdir: the run's directory.
    history_by_fold: fold -> list of per-epoch records, each with "epoch"
      (1-based), "train_loss", "val_score", "val_iou", "learning_rate" and
      "loss_name", as in fold_<k>/done.json's "history".
    cycle_ends: epoch counts at which a cosine cycle ends.

  Returns:
    The path written.
  """
  folds = sorted((f for f, h in history_by_fold.items() if h), key=_sort_key)
  colors = _fold_colors(folds)
  fig = mfigure.Figure(figsize=(10, 9), layout="constrained")
  ax_loss, ax_val, ax_lr = axes = fig.subplots(
      3, 1, sharex=True, gridspec_kw={"height_ratios": [1, 1.25, 0.8]}
  )
  fig.suptitle("Training curves", fontsize=14, fontweight="bold")

  if not folds:
    ax_val.text(
        0.5,
        0.5,
        "no training history yet",
        ha="center",
        va="center",
        transform=ax_val.transAxes,
        fontsize=12,
        color="gray",
    )

  lr_positive, fold_handles = True, []
  for fold in folds:
    handle, positive = _plot_fold_history(axes, fold, history_by_fold[fold], colors[fold])
    fold_handles.append(handle)
    lr_positive &= positive

  # Cycle ends and loss stages are the same for every fold of a run; they are
  # drawn once, from the configuration (cycles) or the longest history (loss).
  for ax in axes:
    for end in cycle_ends:
      ax.axvline(end, color="0.6", ls="--", lw=1.0, zorder=0)
  longest = max((history_by_fold[f] for f in folds), key=len, default=[])
  stages = loss_stages(longest)
  if len(stages) > 1:
    _mark_loss_stages(axes, stages)

  _label_curve_axes(axes, log_lr=bool(folds) and lr_positive)

  # One legend for folds, one for what the line styles and markers mean.
  if folds:
    _curve_legends(fig, ax_val, fold_handles, cycle_ends, loss_switch=len(stages) > 1)
    last_epoch = max(r["epoch"] for f in folds for r in history_by_fold[f])
    ax_lr.set_xlim(0, last_epoch + 0.5)
  return save_atomic(fig, pathlib.Path(workdir) / TRAINING_CURVES)


def _plot_fold_history(axes, fold, history: Sequence[Mapping], color) -> tuple[Any, bool]:
  """One fold's loss, validation scores (its best starred) and learning rate.

  Returns its legend handle and whether its learning rates are all positive.
  """
  ax_loss, ax_val, ax_lr = axes
  history = sorted(history, key=lambda r: r["epoch"])
  epochs = np.array([r["epoch"] for r in history])
  ax_loss.plot(epochs, [r["train_loss"] for r in history], color=color, lw=1.6)
  score = np.array([r["val_score"] for r in history], float)
  ax_val.plot(epochs, score, color=color, lw=1.8)
  ax_val.plot(epochs, [r["val_iou"] for r in history], color=color, lw=1.4, ls=":", alpha=0.85)
  label = f"fold {fold}"
  # The first best, as training keeps the first epoch reaching the maximum.
  if np.isfinite(score).any():
    best = int(np.nanargmax(score))
    ax_val.plot(
        epochs[best],
        score[best],
        marker="*",
        ms=15,
        color=color,
        mec="black",
        mew=0.8,
        zorder=5,
        ls="none",
    )
    # The value goes in the legend: numbers next to the stars would collide
    # when folds peak at the same epoch.
    label += f"  (best {score[best]:.3f} @ epoch {epochs[best]})"
  handle = mlines.Line2D([], [], color=color, lw=2.2, label=label)
  lr = np.array([r["learning_rate"] for r in history], float)
  ax_lr.plot(epochs, lr, color=color, lw=1.4)
  return handle, bool((lr > 0).all())


def _mark_loss_stages(axes, stages: list[tuple[str, int, int]]) -> None:
  """Shades and names each training-loss stage; a line where the loss switches."""
  ax_loss = axes[0]
  for i, (name, first, last) in enumerate(stages):
    shade = _STAGE_SHADES[i % len(_STAGE_SHADES)]
    for ax in axes:
      if shade != "none":
        # Epoch e covers (e - 1, e]: a record is taken at the epoch's end.
        ax.axvspan(first - 1, last, color=shade, zorder=-1, lw=0)
    ax_loss.text(
        (first - 1 + last) / 2,
        0.97,
        f"loss: {name}",
        transform=ax_loss.get_xaxis_transform(),
        ha="center",
        va="top",
        fontsize=9,
        color="0.25",
        style="italic",
    )
  for _, first, _ in stages[1:]:
    for ax in axes:
      ax.axvline(first - 1, color="#d08000", lw=1.3, zorder=0)


def _label_curve_axes(axes, log_lr: bool) -> None:
  ax_loss, ax_val, ax_lr = axes
  ax_loss.set_ylabel("training loss")
  ax_loss.set_title("Training loss (epoch mean)", loc="left", fontsize=11)
  ax_val.set_ylabel("validation")
  ax_val.set_title(
      "Validation: competition score (solid) and IoU (dotted), at threshold 0.5",
      loc="left",
      fontsize=11,
  )
  ax_lr.set_ylabel("learning rate")
  ax_lr.set_title("Learning rate (at each epoch's last step)", loc="left", fontsize=11)
  if log_lr:
    ax_lr.set_yscale("log")
  ax_lr.set_xlabel("epoch")
  ax_lr.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
  for ax in axes:
    ax.grid(True, alpha=0.3)


def _curve_legends(fig, ax_val, fold_handles, cycle_ends, loss_switch: bool) -> None:
  """The folds' legend below the panels; the line styles' and markers' on the scores."""
  # Below the panels, where it hides no curve and no loss-stage label.
  fig.legend(
      handles=fold_handles,
      loc="outside lower center",
      fontsize=9.5,
      ncol=min(len(fold_handles), 3),
      frameon=False,
  )
  keys = [
      mlines.Line2D([], [], color="0.2", lw=1.8, label="competition score"),
      mlines.Line2D([], [], color="0.2", lw=1.4, ls=":", label="IoU"),
      mlines.Line2D(
          [], [], color="0.6", marker="*", ms=12, mec="black", ls="none", label="best epoch"
      ),
  ]
  if cycle_ends:
    keys.append(mlines.Line2D([], [], color="0.6", ls="--", lw=1.0, label="cycle end (snapshot)"))
  if loss_switch:
    keys.append(mlines.Line2D([], [], color="#d08000", lw=1.3, label="loss switch"))
  ax_val.legend(handles=keys, loc="lower right", fontsize=9, framealpha=0.9)

"""PNG figures of a run, written into its workdir.

A person judging a run would rather look than read JSON: these figures show
how training went (training_curves.png), what the out-of-fold predictions look
like at their best and worst (validation_examples.png) and how the
binarisation threshold was chosen (threshold_sweep.png).

Figures are drawn on `matplotlib.figure.Figure` objects directly, never through
pyplot: that needs no display and no GUI backend (the Agg renderer is used to
write the PNG), leaves the process-wide backend of a caller, such as a
notebook, untouched, and cannot leak figures into pyplot's global registry
across a long run.  Every PNG is written under a temporary name in the same
directory and renamed into place, so that a reader never sees half a file.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Sequence

from matplotlib import colors as mcolors
from matplotlib import figure as mfigure
from matplotlib import lines as mlines
from matplotlib import patches as mpatches
from matplotlib import ticker as mticker
import numpy as np

from saltjax import metrics
from saltjax import workdir as workdir_lib

TRAINING_CURVES = "training_curves.png"
VALIDATION_EXAMPLES = "validation_examples.png"
THRESHOLD_SWEEP = "threshold_sweep.png"

DPI = 110
TRUTH_COLOR = "#22dd44"  # green: the true mask's outline
PRED_COLOR = "#ff3030"  # red: the predicted mask's outline
# Backgrounds for successive training-loss stages (first stage unshaded).
_STAGE_SHADES = ("none", "#fff1d6", "#e3f0ff", "#f1e6ff")
# Outlines are traced on masks upsampled by this factor, so that they run
# along pixel edges instead of cutting corners through pixel centres.
_OUTLINE_UPSAMPLE = 4


# ------------------------------------------------------------------ saving ---


def _save_atomic(fig: mfigure.Figure, path: pathlib.Path) -> pathlib.Path:
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
  return _save_atomic(fig, pathlib.Path(workdir) / TRAINING_CURVES)


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


# ------------------------------------------------------- validation grid ---


def select_examples(
    scores: np.ndarray,
    truth_nonempty: np.ndarray,
    num: int,
    *,
    iou: np.ndarray | None = None,
    coverage: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Indices of the best and the worst cases to show, best first / worst first.

  Best: the highest scores among images whose truth holds salt, because a
  correctly empty prediction on an empty image (score 1, and a third or more
  of the data) shows nothing; empty truths only fill up when too few images
  hold salt.  Many images tie at score 1, so ties go to the truth coverage
  nearest 50% (a salt boundary across the picture says more than an all-salt
  square), then to the higher IoU.  Worst: the lowest scores of all images
  (false positives on empty truths are worth seeing too), ties going to the
  lower IoU, excluding those already picked as best.  Remaining ties go to
  the lower index, so the pick is deterministic.  With fewer than 2 * num
  images, they are split between the two, best getting the odd one.

  Args:
    scores: (N,) per-image competition scores.
    truth_nonempty: (N,) bool, whether each truth mask holds salt.
    num: how many best and how many worst to pick, at most.
    iou: (N,) per-image IoU, a tie-break; ignored when None.
    coverage: (N,) truth salt fraction in [0, 1], a tie-break among the best;
      ignored when None.

  Returns:
    (best_idx, worst_idx): int arrays, disjoint.
  """
  scores = np.asarray(scores, float)
  truth_nonempty = np.asarray(truth_nonempty, bool)
  n = len(scores)
  iou = np.zeros(n) if iou is None else np.asarray(iou, float)
  off_half = np.zeros(n) if coverage is None else np.abs(np.asarray(coverage, float) - 0.5)
  num_best = min(num, (n + 1) // 2)
  num_worst = min(num, n - num_best)
  index = np.arange(n)
  # np.lexsort sorts by the last key first.
  best = np.lexsort((index, -iou, off_half, -scores, ~truth_nonempty))[:num_best]
  rest = np.setdiff1d(index, best)
  worst = rest[np.lexsort((rest, iou[rest], scores[rest]))][:num_worst]
  return best.astype(int), worst.astype(int)


def _outline(ax, mask: np.ndarray, color: str, lw: float) -> None:
  """Draws the outline of a binary mask along its pixel edges."""
  mask = np.asarray(mask) != 0
  if not mask.any():
    return
  k = _OUTLINE_UPSAMPLE
  up = np.kron(mask, np.ones((k, k), bool)).astype(np.float32)
  # Pad so that masks touching the border are closed there too.
  up = np.pad(up, 1)
  # Centre of upsampled pixel j (j = 0 is the padding) in image coordinates.
  coords = (np.arange(up.shape[0]) - 1 + 0.5) / k - 0.5
  ax.contour(coords, coords, up, levels=[0.5], colors=[color], linewidths=lw)


# Probability shown as a translucent warm tint; alpha grows with p so that
# confident regions stand out while the seismic texture stays readable.
_PROB_RGB = mcolors.to_rgb("#ffd21f")


_PROB_ALPHA = 0.3


def _prob_overlay(prob: np.ndarray) -> np.ndarray:
  rgba = np.empty(prob.shape + (4,), np.float32)
  rgba[..., :3] = _PROB_RGB
  rgba[..., 3] = _PROB_ALPHA * np.clip(prob, 0.0, 1.0) ** 1.5
  return rgba


def _percent(fraction: float) -> str:
  # Small masks are the hard cases: "0%" would hide a 40-pixel miss.
  if fraction == 0:
    return "none"
  return f"{fraction:.0%}" if fraction >= 0.095 else f"{fraction:.1%}"


def _draw_case(ax, image, truth, prob, pred, title: str) -> None:
  ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
  ax.imshow(_prob_overlay(np.asarray(prob, np.float32)), interpolation="nearest")
  # The truth's line is wider, so that it still shows beside a prediction
  # drawn over it along the same edge.
  _outline(ax, truth, TRUTH_COLOR, 2.6)
  _outline(ax, pred, PRED_COLOR, 1.3)
  # A one-pixel margin, so that outlines along the image border (all-salt
  # masks, salt touching an edge) are not hidden under the frame.
  ax.set_xlim(-1.5, image.shape[1] + 0.5)
  ax.set_ylim(image.shape[0] + 0.5, -1.5)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title, fontsize=8.5, pad=3)


def write_validation_grid(
    workdir,
    images: np.ndarray,
    truth: np.ndarray,
    probs: np.ndarray,
    pred: np.ndarray,
    scores: np.ndarray,
    ids: Sequence[str],
    num: int = 8,
    iou: np.ndarray | None = None,
) -> pathlib.Path:
  """Writes workdir/validation_examples.png: the best and worst OOF cases.

  Each case shows the seismic image in gray, the predicted probability as a
  translucent yellow tint, the true mask's outline in green and the
  predicted (post-processed) mask's outline in red, titled with its id,
  competition score, IoU and salt coverage.  See `select_examples` for
  which cases are picked.

  Args:
    workdir: the run's directory.
    images: (N, H, W) uint8 images.
    truth: (N, H, W) true masks in {0, 1}.
    probs: (N, H, W) predicted salt probabilities.
    pred: (N, H, W) predicted masks in {0, 1}.
    scores: (N,) per-image competition scores.
    ids: N image ids.
    num: how many best and how many worst cases to show.
    iou: (N,) per-image IoU; computed from truth and pred when None.

  Returns:
    The path written.
  """
  images, truth = np.asarray(images), np.asarray(truth) != 0
  probs, pred = np.asarray(probs), np.asarray(pred) != 0
  scores = np.asarray(scores, float)
  iou = metrics.iou_per_image(truth, pred) if iou is None else np.asarray(iou)
  area = truth[0].size if len(truth) else 1
  coverage = truth.reshape(len(truth), -1).sum(1) / area
  best, worst = select_examples(scores, coverage > 0, num, iou=iou, coverage=coverage)

  cols = max(1, min(4, len(best), num))  # best is never shorter than worst
  groups = [
      (f"Best {len(best)} (highest scores, salt in truth first)", best),
      (f"Worst {len(worst)} (lowest scores)", worst),
  ]
  groups = [(t, g) for t, g in groups if len(g)]
  rows = [-(-len(g) // cols) for _, g in groups]
  panel = 2.45
  # At least three panels wide, so that the title and the legend fit.
  fig = mfigure.Figure(
      figsize=(max(cols, 3) * panel, max(1, sum(rows)) * (panel + 0.35) + 0.9), layout="constrained"
  )
  fig.suptitle(
      f"Out-of-fold validation examples ({len(scores)} images, mean score"
      f" {scores.mean() if len(scores) else float('nan'):.3f})",
      fontsize=13,
      fontweight="bold",
  )
  if not groups:
    fig.text(
        0.5, 0.5, "no out-of-fold predictions", ha="center", va="center", fontsize=12, color="gray"
    )
  else:
    subfigs = np.atleast_1d(fig.subfigures(len(groups), 1, height_ratios=rows))
    for subfig, (title, idx), n_rows in zip(subfigs, groups, rows):
      subfig.suptitle(title, fontsize=11.5, x=0.01, ha="left")
      axes = np.atleast_1d(subfig.subplots(n_rows, cols)).reshape(-1)
      for ax in axes[len(idx) :]:
        ax.set_axis_off()
      for ax, i in zip(axes, idx):
        title = (
            f"{ids[i]}\nscore {scores[i]:.2f} · IoU {iou[i]:.2f}\n"
            f"salt: true {_percent(coverage[i])}, pred {_percent(pred[i].sum() / area)}"
        )
        _draw_case(ax, images[i], truth[i], probs[i], pred[i], title)
    keys = [
        mlines.Line2D([], [], color=TRUTH_COLOR, lw=2.6, label="true mask"),
        mlines.Line2D([], [], color=PRED_COLOR, lw=1.3, label="predicted mask"),
        mpatches.Patch(color=_PROB_RGB, alpha=0.6, label="salt probability (yellow tint)"),
    ]
    fig.legend(handles=keys, loc="outside lower center", ncol=3, fontsize=9.5, frameon=False)
  return _save_atomic(fig, pathlib.Path(workdir) / VALIDATION_EXAMPLES)


# -------------------------------------------------------- threshold sweep ---


def write_threshold_sweep(
    workdir,
    sweep: Sequence[Mapping],
    chosen_threshold: float,
    min_area: int,
    final_score: float | None = None,
) -> pathlib.Path:
  """Writes workdir/threshold_sweep.png: OOF score against threshold.

  Args:
    workdir: the run's directory.
    sweep: {"threshold": t, "score": s} items, the OOF competition score of
      masks `probs > t` (before the minimum-area filter).
    chosen_threshold: the threshold used.
    min_area: the minimum mask area used (pixels; smaller masks are emptied).
    final_score: the OOF score after thresholding and the min-area filter,
      noted on the figure when given.

  Returns:
    The path written.
  """
  items = sorted(sweep, key=lambda s: s["threshold"])
  t = np.array([s["threshold"] for s in items], float)
  s = np.array([s["score"] for s in items], float)
  fig = mfigure.Figure(figsize=(8, 4.8), layout="constrained")
  ax = fig.subplots()
  ax.set_title(
      "Out-of-fold competition score vs binarisation threshold", fontsize=12, fontweight="bold"
  )
  chosen_score = _plot_sweep(ax, t, s, chosen_threshold)
  _mark_chosen(ax, chosen_threshold, chosen_score)
  note = f"min area: {min_area} px (smaller masks emptied)"
  if final_score is not None:
    note += f"\nscore with min area: {final_score:.4f}"
  ax.text(
      0.02,
      0.97,
      note,
      transform=ax.transAxes,
      ha="left",
      va="top",
      fontsize=10,
      bbox={"boxstyle": "round,pad=0.4", "fc": "white", "ec": "0.7"},
  )
  ax.set_xlabel("threshold on the predicted salt probability")
  ax.set_ylabel("OOF competition score")
  ax.grid(True, alpha=0.3)
  if len(t):
    ax.legend(loc="best", fontsize=9.5, framealpha=0.9)
  return _save_atomic(fig, pathlib.Path(workdir) / THRESHOLD_SWEEP)


def _plot_sweep(ax, t: np.ndarray, s: np.ndarray, chosen_threshold: float) -> float:
  """The sweep's scores (its best marked when not the chosen one), and the chosen
  threshold's score on that curve: NaN without a sweep."""
  if len(t):
    ax.plot(t, s, "-o", color="C0", ms=4, lw=1.8, label="OOF score (no min-area filter)")
    best = int(np.argmax(s))
    # The chosen threshold is normally the sweep's best; when it was fixed by
    # the config, the best is marked too, to show what that cost.
    near = int(np.argmin(np.abs(t - chosen_threshold)))
    chosen_score = (
        s[near] if np.isclose(t[near], chosen_threshold) else np.interp(chosen_threshold, t, s)
    )
    if not np.isclose(t[best], chosen_threshold):
      ax.plot(
          t[best],
          s[best],
          "D",
          color="0.4",
          ms=7,
          ls="none",
          label=f"sweep best: {t[best]:.2f} → {s[best]:.4f}",
      )
    span = max(float(s.max() - s.min()), 1e-3)
    ax.set_ylim(s.min() - 0.12 * span, s.max() + 0.3 * span)
    ax.set_xlim(min(t.min(), chosen_threshold) - 0.03, max(t.max(), chosen_threshold) + 0.03)
  else:
    chosen_score = float("nan")
    ax.text(
        0.5,
        0.5,
        "no threshold sweep recorded",
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="gray",
        fontsize=12,
    )
  return chosen_score


def _mark_chosen(ax, chosen_threshold: float, chosen_score: float) -> None:
  """A dashed line at the chosen threshold; its score marked and named on the curve."""
  ax.axvline(chosen_threshold, color="C3", ls="--", lw=1.3)
  if np.isfinite(chosen_score):
    ax.plot(
        chosen_threshold,
        chosen_score,
        "o",
        color="C3",
        ms=10,
        mec="black",
        zorder=5,
        ls="none",
        label=f"chosen: {chosen_threshold:.2f} → {chosen_score:.4f}",
    )
    ax.annotate(
        f"threshold {chosen_threshold:.2f}\nscore {chosen_score:.4f}",
        (chosen_threshold, chosen_score),
        textcoords="offset points",
        xytext=(12, 14),
        fontsize=10,
        color="C3",
        fontweight="bold",
        arrowprops={"arrowstyle": "-", "color": "C3", "lw": 0.8},
    )


# ------------------------------------------------------ prediction plots ---


def _field(data, name):
  return data[name] if isinstance(data, Mapping) else getattr(data, name)


def write_prediction_plots(
    workdir,
    data,
    oof_ids: Sequence[str],
    oof_probs: np.ndarray,
    oof_masks: np.ndarray,
    scores_json: Mapping,
    num: int = 8,
) -> list[pathlib.Path]:
  """Writes the validation grid and the threshold sweep of a prediction run.

  Args:
    workdir: the run's directory.
    data: has train_ids, train_images and train_masks (a layout.SaltData or a
      dict with those keys).
    oof_ids: the training ids predicted out-of-fold, in training order.
    oof_probs: (n, 101, 101) their averaged probabilities.
    oof_masks: (n, 101, 101) their final, post-processed masks.
    scores_json: the dict written to scores.json ("threshold_sweep",
      "threshold", "min_area", optionally "oof_score").
    num: how many best and worst cases the grid shows.

  Returns:
    The paths written.
  """
  position = {id_: i for i, id_ in enumerate(_field(data, "train_ids"))}
  missing = [i for i in oof_ids if i not in position]
  if missing:
    raise ValueError(f"{len(missing)} OOF id(s) are not training ids, e.g. {missing[0]!r}")
  rows = np.array([position[i] for i in oof_ids], int)
  images = np.asarray(_field(data, "train_images"))[rows]
  truth = np.asarray(_field(data, "train_masks"))[rows]
  oof_masks = np.asarray(oof_masks)
  grid = write_validation_grid(
      workdir,
      images,
      truth,
      oof_probs,
      oof_masks,
      metrics.precision_per_image(truth, oof_masks),
      list(oof_ids),
      num=num,
      iou=metrics.iou_per_image(truth, oof_masks),
  )
  sweep = write_threshold_sweep(
      workdir,
      scores_json.get("threshold_sweep", []),
      scores_json["threshold"],
      scores_json["min_area"],
      scores_json.get("oof_score"),
  )
  return [grid, sweep]

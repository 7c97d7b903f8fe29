"""The figures of a prediction run: the validation grid and the threshold sweep.

validation_examples.png shows what the out-of-fold predictions look like at
their best and worst, and threshold_sweep.png how the binarisation threshold
was chosen.  They are drawn and saved as `saltjax.plots` draws the training
curves (no pyplot; written atomically), in its colours.
"""

from __future__ import annotations

import pathlib
from typing import Mapping, Sequence

from matplotlib import colors as mcolors
from matplotlib import figure as mfigure
from matplotlib import lines as mlines
from matplotlib import patches as mpatches
import numpy as np

from saltjax import metrics
from saltjax import plots

VALIDATION_EXAMPLES = "validation_examples.png"
THRESHOLD_SWEEP = "threshold_sweep.png"

# Outlines are traced on masks upsampled by this factor, so that they run
# along pixel edges instead of cutting corners through pixel centres.
_OUTLINE_UPSAMPLE = 4


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
  _outline(ax, truth, plots.TRUTH_COLOR, 2.6)
  _outline(ax, pred, plots.PRED_COLOR, 1.3)
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
    _grid_legend(fig)
  return plots.save_atomic(fig, pathlib.Path(workdir) / VALIDATION_EXAMPLES)


def _grid_legend(fig) -> None:
  """What the outlines and the tint mean, below the grid."""
  keys = [
      mlines.Line2D([], [], color=plots.TRUTH_COLOR, lw=2.6, label="true mask"),
      mlines.Line2D([], [], color=plots.PRED_COLOR, lw=1.3, label="predicted mask"),
      mpatches.Patch(color=_PROB_RGB, alpha=0.6, label="salt probability (yellow tint)"),
  ]
  fig.legend(handles=keys, loc="outside lower center", ncol=3, fontsize=9.5, frameon=False)


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
  return plots.save_atomic(fig, pathlib.Path(workdir) / THRESHOLD_SWEEP)


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

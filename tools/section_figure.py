"""Before/after picture of a synthetic section segmented by a trained workdir's ensemble.

  python tools/section_figure.py --workdir=RUN --out=docs/section_before_after.png

The figure in README.md: a synthetic section with its salt-top reflection
made stronger, its salt probability, and the mask against the true body,
with the IoU under the default amplitude rule and under the 99th-percentile clip.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Sequence

import cv2
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# The repository's packages, found from the root put on sys.path above.
from configs import segment as segment_config  # noqa: E402
from saltjax.app import config_checks  # noqa: E402
from saltjax.data import synthetic  # noqa: E402
from saltjax.inference import trained_config  # noqa: E402
from saltjax import plots  # noqa: E402
from saltjax.sections import gray_mapping  # noqa: E402
from saltjax.sections import inputs  # noqa: E402
from saltjax.sections import predictor  # noqa: E402
from saltjax.sections import resampling  # noqa: E402
from saltjax.sections import truth_masks  # noqa: E402
from saltjax import workdir as workdir_lib  # noqa: E402


def write_before_after(
    path: str | os.PathLike,
    gray: np.ndarray,
    prob: np.ndarray,
    mask: np.ndarray,
    truth: np.ndarray | None = None,
    title: str = "",
) -> pathlib.Path:
  """A PNG of a section before (gray) and after (probability, salt outline)."""
  from matplotlib import figure as mfigure
  from matplotlib import lines as mlines

  rows, cols = gray.shape
  fig = mfigure.Figure(
      figsize=(3 * 4.2 * cols / max(rows, cols) + 0.6, 4.2 * rows / max(rows, cols) + 1.1),
      layout="constrained",
  )
  axes = fig.subplots(1, 3)
  panels = (
      ("section (input)", gray, "gray", 255),
      ("salt probability", prob, "magma", 1),
      ("salt mask over the section", gray, "gray", 255),
  )
  for ax, (name, image, cmap, top) in zip(axes, panels):
    ax.imshow(image, cmap=cmap, vmin=0, vmax=top, interpolation="nearest", aspect="auto")
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("trace")
    ax.set_ylabel("sample")
  handles = []
  if truth is not None:
    axes[2].contour(
        np.asarray(truth, float), levels=[0.5], colors=[plots.TRUTH_COLOR], linewidths=2.4
    )
    handles.append(mlines.Line2D([], [], color=plots.TRUTH_COLOR, lw=2.4, label="true body"))
  axes[2].contour(np.asarray(mask, float), levels=[0.5], colors=[plots.PRED_COLOR], linewidths=1.2)
  handles.append(mlines.Line2D([], [], color=plots.PRED_COLOR, lw=1.2, label="predicted salt"))
  fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
  if title:
    fig.suptitle(title, fontsize=11)
  path = pathlib.Path(path)
  workdir_lib.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
  return path


def boost_salt_top(amplitude: np.ndarray, mask: np.ndarray, factor: float = 8.0) -> np.ndarray:
  """The section with the reflection along the salt's outline `factor` times stronger.

  A strong top-of-salt reflection, as on many real lines: it sets the 99th
  percentile of |a|, so the percentile rule maps the layered sediments to
  almost flat gray.
  """
  kernel = np.ones((5, 5), np.uint8)
  mask = np.asarray(mask, np.uint8)
  rim = (cv2.dilate(mask, kernel) - cv2.erode(mask, kernel)) > 0
  return np.where(rim, factor * amplitude, amplitude).astype(np.float32)


def main(argv: Sequence[str] | None = None) -> None:
  """python tools/section_figure.py --workdir=runs/x --out=docs/section_before_after.png"""
  parser = argparse.ArgumentParser(description="Before/after picture of a synthetic section")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--seed", type=int, default=11)
  parser.add_argument("--rows", type=int, default=256)
  parser.add_argument("--cols", type=int, default=480)
  parser.add_argument(
      "--salt_top", type=float, default=8.0, help="the salt outline's reflection x this"
  )
  args = parser.parse_args(argv)
  workdir = pathlib.Path(args.workdir)
  config = segment_config.get_config()
  trained = trained_config.config_for_prediction(config, workdir)
  config_checks.check(trained)
  trained.segment = config.segment
  ensemble = predictor.load_ensemble(trained, workdir)
  stats, _ = gray_mapping.training_gray_levels(trained, workdir)
  amplitude, truth = synthetic.generate_section(args.seed, args.rows, args.cols)
  amplitude = boost_salt_top(amplitude, truth, args.salt_top)

  scan = inputs.scan_input(inputs.in_memory_input(amplitude))
  resolved = resampling.with_scale(
      config.segment, resampling.choose_scale(scan, config.segment, stats)[0]
  )
  matched = gray_mapping.match_training_clip(*scan.pairs, stats)[0]

  def segment(clip):
    gray = gray_mapping.amplitude_to_gray(amplitude, clip)
    ((prob, mask),) = predictor.probabilities_and_masks([gray], ensemble, resolved)
    return gray, prob, mask, truth_masks.truth_scores(truth, mask)["iou"]

  gray, prob, mask, iou = segment(matched)
  percentile_iou = segment(
      gray_mapping.clip_level(amplitude, gray_mapping.DEFAULT_CLIP_PERCENTILE)
  )[3]
  title = (
      f"synthetic {args.rows} x {args.cols} section (seed {args.seed}, salt-top reflection"
      f" x{args.salt_top:g}), {len(ensemble.models)} model(s)\nIoU with the true body: {iou:.2f}"
      f" with the default amplitude rule ('match_training'); {percentile_iou:.2f} with the"
      " 99th-percentile clip"
  )
  print(write_before_after(args.out, gray, prob, mask, truth, title), title)


if __name__ == "__main__":
  main()

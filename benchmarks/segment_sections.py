"""Whole-section segmentation throughput: sections per second.

Times saltjax.sections' per-section work on a synthetic section held in
memory: amplitude -> gray (symmetric clipping), overlapping 101x101 tiles,
the ensemble's TTA predictions (`saltjax.inference.ensemble.tile_predictor`, the function
`configs/segment.py` uses), windowed blending, thresholding and the
minimum-area filter. Reading and writing files are not timed. The model has
random weights: the speed does not depend on what it learned.

Per measurement: one warm-up section (compiles the inference function), then
`--repeats` timings of `--sections` sections each; the median is reported.

Usage:
  JAX_PLATFORMS=cpu python benchmarks/segment_sections.py --quick   # CPU, quick model
  python benchmarks/segment_sections.py --model fold --members 15   # GPU, ResNet50, 5 folds x 3 snapshots

Writes benchmarks/results/segment_sections_cpu.json on a CPU
(segment_sections_<device>.json otherwise, or --output) and prints a line.

Accuracy of the amplitude rules (`--accuracy`): a trained workdir (with
`--train`, the small model tests/sections/test_sections.py trains, about 1-2 minutes
of CPU) segments sections whose true salt is known, each rendered several
ways: scaled x0.01 / x1 / x1000, with a strong salt-top reflection, with one
very strong flat reflector, with amplitudes fading with depth, with extra
noise, smoother, sections drawn by a renderer independent of
saltjax.data.synthetic (flat layers, a dome and a detached lens), and 8-bit
pictures of the sections drawn darker, lighter and flatter than the training
tiles (as PNGs are), and sections sampled twice as finely (in depth and
along the line, in depth only, or along the line only) or 1.5 times as
coarsely.  Every section is mapped by the default rule ('match_training',
the workdir's gray_levels.json) and by the 99th-percentile rule, the
pictures also as they are ('as_is'), all at the section's own sampling
(scale 1 x 1); every section also as `segment` does by default, with the
scale factors estimated (segment.scale_samples / scale_traces -1), and the
resampled sections also at their true factors; the IoU of each mask with the
true body is written to benchmarks/results/segment_sections_accuracy.json:

  JAX_PLATFORMS=cpu python benchmarks/segment_sections.py --accuracy --train --workdir=/tmp/acc
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import report  # noqa: E402  (beside this script)

sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", type=int, default=None, help="samples per trace (default 500)")
  p.add_argument("--cols", type=int, default=None, help="traces per section (default 1000)")
  p.add_argument(
      "--model",
      default="quick",
      choices=("quick", "fold"),
      help="the model of configs/quick.py (CPU size) or configs/fold.py (ResNet50)",
  )
  p.add_argument(
      "--members",
      type=int,
      default=1,
      help="ensemble members (folds x snapshots), each run on every tile",
  )
  p.add_argument("--tta", default="hflip")
  p.add_argument("--stride", type=int, default=50)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
  p.add_argument("--sections", type=int, default=None, help="sections per timed repeat")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument(
      "--quick",
      action="store_true",
      help="a 300 x 400 section, 2 sections x 2 repeats: minutes on a small CPU",
  )
  p.add_argument("--output", default="", help="JSON path (default benchmarks/results/...)")
  p.add_argument("--accuracy", action="store_true", help="IoU of the amplitude rules' masks")
  p.add_argument("--workdir", default="", help="--accuracy: the trained workdir to use")
  p.add_argument("--train", action="store_true", help="--accuracy: train the tests' model first")
  p.add_argument("--seeds", default="11,12,31,41", help="--accuracy: synthetic section seeds")
  args = p.parse_args(argv)
  args.rows = args.rows or (300 if args.quick else 500)
  args.cols = args.cols or (400 if args.quick else 1000)
  args.sections = args.sections or (2 if args.quick else 5)
  if args.quick:
    args.repeats = min(args.repeats, 2)
  return args


def versions() -> dict:
  return report.versions(
      (
          "jax",
          "jaxlib",
          "flax",
          "numpy",
          "opencv-python-headless",
          "segyio",
          "jax-cuda12-plugin",
          "jax-cuda13-plugin",
      )
  )


def _tile_predictor(args):
  """The config, the ensemble's tile function (random weights) and its parameter count."""
  import jax
  from saltjax.inference import ensemble as ensemble_lib
  from saltjax.training import state as train_state

  config = __import__(f"configs.{args.model}", fromlist=["get_config"]).get_config()
  config.model.dtype = args.dtype
  config.predict.tta = args.tta
  config.predict.batch_size = args.batch_size
  config.progress = False
  model = train_state.create_model(config)
  members = [
      (train_state.initialized(jax.random.key(i), model, config.image_size), 1.0 / args.members)
      for i in range(args.members)
  ]
  num_params = sum(x.size for x in jax.tree.leaves(members[0][0]["params"]))
  return config, ensemble_lib.tile_predictor(config, model, members), num_params


def _time_sections(args, predict_tiles) -> tuple[float, list[float]]:
  """The warm-up section's seconds, and each repeat's seconds per section."""
  from saltjax.data import synthetic
  from saltjax.sections import gray_mapping
  from saltjax.sections import predictor
  from saltjax.sections import tiling

  amplitude, _ = synthetic.generate_section(0, args.rows, args.cols)
  clip = gray_mapping.clip_level(amplitude, 99.0)
  window = tiling.tile_window()

  def one_section():
    gray = gray_mapping.amplitude_to_gray(amplitude, clip)
    (prob,) = tiling.segment_sections([gray], predict_tiles, args.stride, window)
    return predictor.remove_small_regions(prob > 0.5, 20)

  start = time.perf_counter()
  one_section()
  warmup_s = time.perf_counter() - start
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    for _ in range(args.sections):
      one_section()
    times.append((time.perf_counter() - start) / args.sections)
  return warmup_s, times


def main(argv=None) -> dict:
  args = parse_args(argv)
  import jax
  from saltjax.sections import tiling

  config, predict_tiles, num_params = _tile_predictor(args)
  num_tiles = len(tiling.tile_starts(args.rows, args.stride)) * len(
      tiling.tile_starts(args.cols, args.stride)
  )
  warmup_s, times = _time_sections(args, predict_tiles)
  per_section = statistics.median(times)

  device = jax.devices()[0]
  result = {
      "benchmark": "whole-section segmentation (benchmarks/segment_sections.py)",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "git_commit": report.git_commit(),
      "device": {
          "platform": device.platform,
          "device_kind": device.device_kind,
          "num_devices": jax.device_count(),
          "host": platform.node(),
          "host_cpus": os.cpu_count(),
          # Other jobs on a shared host slow the numbers: recorded, not hidden.
          "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
      },
      "versions": versions(),
      "settings": {
          "section": f"{args.rows} samples x {args.cols} traces",
          "stride": args.stride,
          "tiles_per_section": num_tiles,
          "model": f"configs/{args.model}.py",
          "model_params": int(num_params),
          "image_size": config.image_size,
          "dtype": args.dtype,
          "tta": args.tta,
          "ensemble_members": args.members,
          "batch_size": args.batch_size,
          "sections_per_repeat": args.sections,
          "repeats": args.repeats,
      },
      "warmup_s": round(warmup_s, 3),
      "seconds_per_section": [round(t, 4) for t in times],
      "sections_per_s": round(1.0 / per_section, 4),
      "tiles_per_s": round(num_tiles / per_section, 1),
  }
  print(
      f"{args.rows} x {args.cols} section, {num_tiles} tiles, configs/{args.model}.py model"
      f" x {args.members}, TTA {args.tta}, on {device.device_kind}:"
      f" {result['sections_per_s']:.3g} sections/s ({result['tiles_per_s']:.0f} tiles/s)"
  )
  stem = (
      "segment_sections_cpu"
      if device.platform == "cpu"
      else f"segment_sections_{report.slug(device.device_kind)}"
  )
  report.write_result(result, args.output or str(report.RESULTS / f"{stem}.json"), stem)
  return result


# ----------------------------------------------------------------- accuracy ---


def independent_section(seed: int, rows: int = 256, cols: int = 480):
  """A section drawn without saltjax.data.synthetic: layers, a salt dome and a detached lens.

  Flat, gently dipping and folded layers of Gaussian impedance, a dome rising
  from the base and an elliptic lens above its flank, both of high, slightly
  noisy impedance; vertical reflectivity convolved with a 0.1 cycle/sample
  Ricker wavelet, a little noise, and an arbitrary overall scale.
  """
  import cv2
  import numpy as np

  rng = np.random.default_rng([seed, 0xA17])
  y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
  crest, cx = rng.uniform(0.35, 0.5) * rows, rng.uniform(0.3, 0.5) * cols
  half_width = rng.uniform(0.18, 0.25) * cols
  dome = y > crest + (rows - crest) * ((x - cx) / half_width) ** 2
  lx, ly = rng.uniform(0.7, 0.85) * cols, rng.uniform(0.25, 0.4) * rows
  lens = ((x - lx) / (0.1 * cols)) ** 2 + ((y - ly) / (0.06 * rows)) ** 2 < 1
  salt = dome | lens
  depth = y + 0.05 * (x - cols / 2) + 4 * np.sin(x / cols * 2 * np.pi * rng.uniform(0.5, 1.5))
  tops = np.cumsum(rng.exponential(3.0, 400))
  values = rng.normal(0, 1, 401)
  impedance = values[np.clip(np.searchsorted(tops, depth + 20), 0, 400)]
  impedance = np.where(salt, 4.0 + 0.2 * rng.standard_normal(salt.shape), impedance)
  reflectivity = np.zeros_like(impedance, np.float32)
  reflectivity[1:] = np.diff(impedance, axis=0)
  t = np.arange(-12, 13, dtype=np.float32)
  a = (np.pi * 0.1 * t) ** 2
  wavelet = ((1 - 2 * a) * np.exp(-a)).reshape(-1, 1)
  amplitude = cv2.filter2D(reflectivity, -1, wavelet)
  amplitude += 0.05 * rng.standard_normal(amplitude.shape).astype(np.float32)
  return (amplitude * 10 ** rng.uniform(-3, 3)).astype(np.float32), salt.astype(np.uint8)


def accuracy_cases(seeds):
  """(name, amplitude, true mask) of every section and rendering measured."""
  import cv2
  import numpy as np
  from saltjax.data import synthetic
  from saltjax.sections import gray_mapping
  from tools.section_figure import boost_salt_top  # the README's figure

  for seed in seeds:
    a, m = synthetic.generate_section(seed, 256, 480)
    yield f"synthetic {seed}", a, m
    for scale in (0.01, 1000.0):
      yield f"synthetic {seed} x{scale:g}", scale * a, m
    yield f"synthetic {seed} salt top x8", boost_salt_top(a, m, 8.0), m
    strong = a.copy()
    strong[60:65] = 30 * np.abs(a).max() * np.sign(a[60:65] + 1e-9)
    yield f"synthetic {seed} strong reflector (2% of samples)", strong, m
    yield f"synthetic {seed} fading with depth", a * np.exp(-2.0 * np.arange(256) / 256)[:, None], m
    noisy = a + 0.5 * a.std() * np.random.default_rng(seed).standard_normal(a.shape)
    yield f"synthetic {seed} noisier", noisy.astype(np.float32), m
    yield f"synthetic {seed} smoother", cv2.GaussianBlur(a, (0, 0), 0.1, sigmaY=1.2), m
  for seed in range(len(seeds)):
    yield f"independent renderer {seed}", *independent_section(seed)
  # 8-bit pictures: gray = round(middle + contrast * a / (the 99th percentile
  # of |a|)), clipped to 0-255; contrast 127.5 fills the 8 bits.
  for seed in seeds:
    a, m = synthetic.generate_section(seed, 256, 480)
    unit = gray_mapping.clip_level(a, 99.0)
    for middle, contrast in ((128, 40.0), (70, 127.5), (70, 16.0), (190, 40.0)):
      picture = np.clip(np.rint(middle + contrast * a / unit), 0, 255).astype(np.uint8)
      yield f"synthetic {seed} 8-bit, middle gray {middle}, contrast {contrast:g}", picture, m
  # Sampled twice as finely: every feature twice the size in pixels.
  for seed in seeds:
    a, m = synthetic.generate_section(seed, 256, 480)
    for name, (fy, fx) in (
        ("in depth and along the line", (2, 2)),
        ("in depth", (2, 1)),
        ("along the line", (1, 2)),
    ):
      size = (480 * fx, 256 * fy)
      yield (
          f"synthetic {seed} sampled 2x finer {name}",
          cv2.resize(a, size, interpolation=cv2.INTER_CUBIC),
          cv2.resize(m, size, interpolation=cv2.INTER_NEAREST),
      )
  # Sampled 1.5 times as coarsely: drawn 1.5x larger, then averaged down.
  for seed in seeds:
    a, m = synthetic.generate_section(seed, 384, 720)
    yield (
        f"synthetic {seed} sampled 1.5x coarser in depth and along the line",
        cv2.resize(a, (480, 256), interpolation=cv2.INTER_AREA),
        cv2.resize(m, (480, 256), interpolation=cv2.INTER_NEAREST),
    )


def true_scale(name: str) -> tuple[float, float] | None:
  """(samples, traces) factors that bring a resampled case back to the tiles' sampling."""
  if "finer" in name:
    return (0.5 if "in depth" in name else 1.0, 0.5 if "along the line" in name else 1.0)
  if "coarser" in name:
    return (1.5, 1.5)
  return None


def _train_tests_model(workdir):
  """The small model tests/sections/test_sections.py trains, and its tuned post-processing."""
  import tempfile
  from configs import predict as predict_config
  from saltjax.app import run
  from tests.conftest import tiny_config
  from tests.sections.test_sections import TRAIN

  cache = tempfile.mkdtemp(prefix="saltjax_bench_")
  config = tiny_config(cache, cache, **TRAIN)
  assert run.main(config, str(workdir)) == 0
  config = predict_config.get_config()
  config.progress, config.predict.tta, config.predict.batch_size = False, "none", 32
  assert run.main(config, str(workdir)) == 0


# The amplitude rules measured: the key of each in a row -> segment.amplitude.
_RULES = {"match_training": "match_training", "percentile_99": "percentile", "as_is": "as_is"}


def _trained_ensemble(args, workdir):
  """The workdir's ensemble for `segment` and its training gray levels (stats, note)."""
  from configs import segment as segment_config
  from saltjax.app import config_checks
  from saltjax.inference import trained_config
  from saltjax.sections import gray_mapping
  from saltjax.sections import predictor

  if args.train:
    _train_tests_model(workdir)
  config = segment_config.get_config()
  config.predict.tta, config.predict.batch_size = "none", 32
  trained = trained_config.config_for_prediction(config, workdir)
  config_checks.check(trained)
  trained.segment = config.segment
  ensemble = predictor.load_ensemble(trained, workdir)
  stats, stats_note = gray_mapping.training_gray_levels(trained, workdir)
  return ensemble, stats, stats_note


def _accuracy_rows(args, ensemble, stats) -> list[dict]:
  """One row of IoUs a case, by rule and scale, each printed."""
  import types

  import numpy as np
  from saltjax.sections import gray_mapping
  from saltjax.sections import inputs
  from saltjax.sections import predictor
  from saltjax.sections import segment
  from saltjax.sections import truth_masks

  def iou_of(section, truth, rule, scale=(1.0, 1.0)):
    """(IoU, scale factors) of the mask `segment` makes when it maps the section by
    `rule` (clip choice included) and resamples it by `scale` (samples, traces;
    -1: chosen as `segment` chooses them)."""
    source = inputs.in_memory_input(section)
    options = types.SimpleNamespace(
        amplitude=rule,
        clip_percentile=99.0,
        clip_value=0.0,
        scale_samples=scale[0],
        scale_traces=scale[1],
        stride=args.stride,
    )
    scan = inputs.scan_input(source)
    options, _, report, _ = segment.map_to_model(source, scan, options, stats)
    gray = gray_mapping.model_gray(section, report)
    ((_, mask),) = predictor.probabilities_and_masks([gray], ensemble, options)
    factors = [options.scale_samples, options.scale_traces]
    return round(truth_masks.truth_scores(truth, mask)["iou"], 4), factors

  rows = []
  for name, section, truth in accuracy_cases([int(s) for s in args.seeds.split(",")]):
    row = {"section": name, "true_salt_fraction": round(float(truth.mean()), 3)}
    for key, rule in _RULES.items():
      if rule != "as_is" or section.dtype == np.uint8:
        row[key] = iou_of(section, truth, rule)[0]
    row["default"], row["estimated_scale"] = iou_of(section, truth, "match_training", (-1, -1))
    if true_scale(name):
      row["match_training_resampled"] = iou_of(section, truth, "match_training", true_scale(name))[
          0
      ]
    rows.append(row)
    print(f"{name:56s} IoU " + "  ".join(f"{k} {v}" for k, v in list(row.items())[2:]))
  return rows


def _accuracy_summary(rows: list[dict]) -> dict:
  """Mean and minimum IoU by rule, for each kind of section and for all."""
  import numpy as np

  def summary_of(subset):
    return {
        key: {
            "mean_iou": round(float(np.mean([r[key] for r in subset])), 4),
            "min_iou": round(float(np.min([r[key] for r in subset])), 4),
            "sections_with_iou_at_least_0.7": sum(r[key] >= 0.7 for r in subset),
            "sections": len(subset),
        }
        for key in (*_RULES, "default", "match_training_resampled")
        if all(key in r for r in subset)
    }

  resampled = [r for r in rows if true_scale(r["section"])]
  return {
      "amplitudes": summary_of([r for r in rows if "as_is" not in r and r not in resampled]),
      "8-bit pictures": summary_of([r for r in rows if "as_is" in r]),
      **{
          f"sampled {kind}": summary_of([r for r in resampled if r["section"].endswith(kind)])
          for kind in (
              "2x finer in depth and along the line",
              "2x finer in depth",
              "2x finer along the line",
              "1.5x coarser in depth and along the line",
          )
      },
      "every section": summary_of(rows),
  }


def accuracy(args) -> dict:
  workdir = pathlib.Path(args.workdir or "runs/segment_accuracy")
  ensemble, stats, stats_note = _trained_ensemble(args, workdir)
  rows = _accuracy_rows(args, ensemble, stats)
  summary = _accuracy_summary(rows)
  result = {
      "benchmark": "amplitude rules' mask IoU (benchmarks/segment_sections.py --accuracy)",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "git_commit": report.git_commit(),
      "model": "tests/sections/test_sections.py's small model (1 fold, width 8, 64x64 input, 8 epochs on"
      " 96 synthetic tiles)"
      if args.train
      else str(workdir),
      "threshold": ensemble.threshold,
      "min_area": ensemble.min_area,
      "stride": args.stride,
      "training_gray_levels": stats_note,
      "sections": len(rows),
      "summary": summary,
      "per_section": rows,
  }
  print(summary)
  out = args.output or str(report.RESULTS / "segment_sections_accuracy.json")
  report.write_result(result, out, "segment_sections_accuracy")
  return result


if __name__ == "__main__":
  parsed = parse_args()
  if parsed.accuracy:
    accuracy(parsed)
  else:
    main()

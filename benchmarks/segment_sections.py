"""Whole-section segmentation throughput: sections per second.

Times saltjax.sections' per-section work on a synthetic section held in
memory: amplitude -> gray (symmetric clipping), overlapping 101x101 tiles,
the ensemble's TTA predictions (`sections.tile_predictor`, the function
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


def main(argv=None) -> dict:
  args = parse_args(argv)
  import jax
  from saltjax import sections
  from saltjax import synthetic
  from saltjax import train as train_lib

  config = __import__(f"configs.{args.model}", fromlist=["get_config"]).get_config()
  config.model.dtype = args.dtype
  config.predict.tta = args.tta
  config.predict.batch_size = args.batch_size
  config.progress = False
  model = train_lib.create_model(config)
  members = [
      (train_lib.initialized(jax.random.key(i), model, config.image_size), 1.0 / args.members)
      for i in range(args.members)
  ]
  num_params = sum(x.size for x in jax.tree.leaves(members[0][0]["params"]))
  predict_tiles = sections.tile_predictor(config, model, members)

  amplitude, _ = synthetic.generate_section(0, args.rows, args.cols)
  clip = sections.clip_level(amplitude, 99.0)
  window = sections.tile_window()
  num_tiles = len(sections.tile_starts(args.rows, args.stride)) * len(
      sections.tile_starts(args.cols, args.stride)
  )

  def one_section():
    gray = sections.amplitude_to_gray(amplitude, clip)
    (prob,) = sections.segment_sections([gray], predict_tiles, args.stride, window)
    return sections.remove_small_regions(prob > 0.5, 20)

  start = time.perf_counter()
  one_section()
  warmup_s = time.perf_counter() - start
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    for _ in range(args.sections):
      one_section()
    times.append((time.perf_counter() - start) / args.sections)
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


if __name__ == "__main__":
  main()

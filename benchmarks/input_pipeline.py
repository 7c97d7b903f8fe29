"""Throughput of the tf.data training pipeline alone, on this machine's CPUs.

Feeds nothing to a model: it iterates `saltjax.input_pipeline.tfdata.train_dataset`
as the train loop did before its feeder (`saltjax.training.feeders.TfDataFeeder`) made
one pipeline for the F folds (one pipeline per fold, batches as numpy via
`epoch_iterator`), over the embedded synthetic dataset that
`saltjax.data.dataset.load` generates for the config. The first epoch fills the
dataset's in-memory cache and warms tf.data's autotuner, so it is timed apart;
images/s is then measured over the following epochs.

The question it answers: can the host keep a GPU fed? Compare its images/s
with the train step's images/s from train_throughput.py on the GPU: a
pipeline slower than the step leaves the accelerator waiting.

Usage:
  python benchmarks/input_pipeline.py                    # quick and fold configs
  python benchmarks/input_pipeline.py --configs fold --epochs 3
  python benchmarks/input_pipeline.py --augment hflip 'hflip|shift(8)'

The synthetic data are generated into a temporary directory (--cache_dir to
reuse one) so that nothing is written under ~/.cache.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
HEAVY = "hflip|shift(8)|brightness(0.1)|contrast(0.1)"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
      "--configs",
      nargs="+",
      default=["quick", "fold"],
      help="config modules under configs/ (their data, batch and image size)",
  )
  p.add_argument(
      "--augment",
      nargs="+",
      default=["hflip", HEAVY],
      help="augmentation specs to time (config.augment syntax)",
  )
  p.add_argument(
      "--epochs",
      type=int,
      default=10,
      help="timed epochs after the warm-up (an epoch is well under a second)",
  )
  p.add_argument(
      "--cache_dir", default="", help="where the synthetic data go (default: a temporary directory)"
  )
  p.add_argument("--label", default="", help="free text stored in the JSON")
  p.add_argument("--output", default="", help="JSON path (default benchmarks/results/...)")
  return p.parse_args(argv)


def time_epoch(for_epoch, epoch: int) -> tuple[float, int]:
  from saltjax.input_pipeline import tfdata

  started, images = time.perf_counter(), 0
  for batch in tfdata.epoch_iterator(for_epoch, epoch):
    images += len(batch["image"])
  return time.perf_counter() - started, images


def bench(config_name: str, spec: str, data, args) -> dict:
  from saltjax.input_pipeline import tfdata

  config = importlib.import_module(f"configs.{config_name}").get_config()
  for_epoch = tfdata.train_dataset(
      data.train_images,
      data.train_masks,
      batch_size=config.batch_size,
      image_size=config.image_size,
      resize_mode=config.resize_mode,
      augment_spec=spec,
      seed=config.seed,
  )
  warmup_s, _ = time_epoch(for_epoch, 0)
  seconds, images = 0.0, 0
  per_epoch = []
  for epoch in range(1, args.epochs + 1):
    s, n = time_epoch(for_epoch, epoch)
    seconds, images = seconds + s, images + n
    per_epoch.append(n / s)
  return {
      "config": config_name,
      "augment": spec,
      "batch_size": config.batch_size,
      "image_size": config.image_size,
      "resize_mode": config.resize_mode,
      "num_images": len(data.train_images),
      "warmup_epoch_s": warmup_s,
      "timed_epochs": args.epochs,
      "images_per_s": images / seconds,
      # Less sensitive than the mean to other jobs sharing the CPUs.
      "images_per_s_median_epoch": statistics.median(per_epoch),
      "images_per_s_per_epoch": per_epoch,
      "batches_per_s": images / seconds / config.batch_size,
  }


def main(argv=None) -> dict:
  args = parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  from saltjax.data import dataset as data_lib

  tmp = None
  cache_dir = args.cache_dir
  if not cache_dir:
    tmp = tempfile.TemporaryDirectory(prefix="saltjax-bench-")
    cache_dir = tmp.name
  cpus = len(os.sched_getaffinity(0))
  result = {
      "benchmark": "saltjax tf.data training pipeline (benchmarks/input_pipeline.py)",
      "label": args.label,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "host": {
          "cpus_usable": cpus,
          "cpu_count": os.cpu_count(),
          "processor": platform.processor(),
          "node": platform.node(),
          "load_average_before": os.getloadavg(),
      },
      "versions": {"python": platform.python_version(), "tensorflow": tf.__version__},
      "results": [],
  }
  loaded = {}
  for name in args.configs:
    config = importlib.import_module(f"configs.{name}").get_config()
    config.cache_dir = cache_dir
    key = (config.synthetic.num_train, config.synthetic.num_test, config.synthetic.seed)
    if key not in loaded:
      started = time.perf_counter()
      loaded[key] = data_lib.load(config, load_test=False)
      print(
          f"{name}: {len(loaded[key].train_images)} training images loaded in"
          f" {time.perf_counter() - started:.1f}s",
          flush=True,
      )
    for spec in args.augment:
      row = bench(name, spec, loaded[key], args)
      result["results"].append(row)
      print(
          f"{name:>6} batch {row['batch_size']:>3} {row['image_size']}px"
          f"  {spec:<45} {row['images_per_s']:>6.0f} images/s"
          f" (median epoch {row['images_per_s_median_epoch']:.0f})"
          f"  (warm-up epoch {row['warmup_epoch_s']:.1f}s)",
          flush=True,
      )
  result["host"]["load_average_after"] = os.getloadavg()
  if tmp is not None:
    tmp.cleanup()
  out = pathlib.Path(args.output) if args.output else RESULTS / f"input_pipeline_cpu{cpus}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n")
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()

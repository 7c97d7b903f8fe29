"""Feeding F folds at once: the tf.data feeder against the on-device pipeline.

A train loop that trains F folds together (vmapped over a leading fold axis)
needs, every step, one batch from each of F fold datasets: F x batch_size
images. This script times that input alone, two ways:

- tfdata: `feeders.TfDataFeeder`, as the train loop uses it (one
  `input_pipeline.TrainPipeline` for the F folds, global (F, B, S, S, 1)
  arrays on the device); timed twice: taking batches as fast as they come
  (images/s), and with a simulated step (`--step_seconds` of sleep) between
  batches, where `host_wait_s` is the time spent waiting for the feeder per
  epoch: the host seconds per epoch outside the steps;
- device: `on_device.make_train_batch_fn` jitted, the uint8 data on the
  device; each step's (F, B, S, S, 1) batch is produced there and waited for
  (`block_until_ready`), so its time is the device's, with no overlap.

The first epoch is a warm-up (tf.data's cache and autotuner; XLA's compile,
reported apart) and is not timed. Runs without TensorFlow too: the tfdata
rows are then skipped (the GPU machine has no TensorFlow).

Usage:
  python benchmarks/input_pipeline_folds.py                          # F=5 x 32 at 128 px
  python benchmarks/input_pipeline_folds.py --pipelines device --epochs 2
  python benchmarks/input_pipeline_folds.py --quick                  # a few steps, smoke test
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
HEAVY = "hflip|shift(8)|brightness(0.1)|contrast(0.1)"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="fold", help="config module under configs/")
  p.add_argument("--folds", type=int, default=5, help="folds fed at once (F)")
  p.add_argument("--batch_size", type=int, default=32, help="batch per fold (B)")
  p.add_argument("--image_size", type=int, default=128)
  p.add_argument(
      "--augment",
      nargs="+",
      default=["hflip", HEAVY],
      help="augmentation specs to time (config.augment syntax)",
  )
  p.add_argument(
      "--pipelines", nargs="+", default=["tfdata", "device"], choices=["tfdata", "device"]
  )
  p.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up")
  p.add_argument(
      "--step_seconds",
      type=float,
      default=0.2,
      help="tfdata: a simulated train step (sleep) for the host-wait timing",
  )
  p.add_argument(
      "--max_steps", type=int, default=0, help="cap on steps per epoch (0: the whole epoch)"
  )
  p.add_argument(
      "--num_train", type=int, default=0, help="synthetic training images (default: the config's)"
  )
  p.add_argument(
      "--quick",
      action="store_true",
      help="smoke test: 2 folds x 8, 1 timed epoch of 3 steps, 200 images",
  )
  p.add_argument(
      "--cache_dir", default="", help="where the synthetic data go (default: a temporary directory)"
  )
  p.add_argument("--label", default="", help="free text stored in the JSON")
  p.add_argument("--output", default="", help="JSON path (default benchmarks/results/...)")
  args = p.parse_args(argv)
  if args.quick:
    args.folds, args.batch_size, args.epochs, args.max_steps = 2, 8, 1, 3
    args.num_train = args.num_train or 200
  return args


def _steps(fold_sizes, batch_size, max_steps) -> int:
  steps = min(fold_sizes) // batch_size
  return min(steps, max_steps) if max_steps else steps


def bench_tfdata(config, data, fold_of, spec, args) -> dict:
  """`feeders.TfDataFeeder`, as the train loop uses it: global (F, B, ...) arrays.

  Two timings per epoch: `epoch_s`, the wall time when batches are taken as
  fast as they come (throughput), and `host_wait_s`, the time the consumer
  spends inside the feeder when each step takes `--step_seconds` (a sleep
  standing in for the accelerator's step): the host seconds per epoch outside
  the steps, the train loop's overhead.
  """
  import jax
  import numpy as np
  from saltjax import parallel
  from saltjax.training import feeders

  config = config.copy_and_resolve_references()
  config.augment = spec
  config.image_size = args.image_size
  config.batch_size = args.batch_size
  folds = list(range(args.folds))
  examples = [feeders._training_examples(config, data, k, fold_of, None) for k in folds]
  steps = _steps([len(x[0]) for x in examples], args.batch_size, args.max_steps)
  mesh = parallel.create_mesh()
  started = time.perf_counter()
  try:
    feeder = feeders.TfDataFeeder(config, examples, folds, mesh, steps_per_epoch=steps)
  except TypeError:  # the feeder before issue 18 (F datasets per epoch) has no steps argument
    feeder = feeders.TfDataFeeder(config, examples, folds, mesh)
  build_s = time.perf_counter() - started

  def epoch(e, step_s):
    started, wait = time.perf_counter(), 0.0
    batches = feeder.epoch(e)
    for _ in range(steps):
      t = time.perf_counter()
      batch = next(batches)
      wait += time.perf_counter() - t
      if step_s:
        time.sleep(step_s)
    batches.close()
    jax.block_until_ready(batch)
    assert batch["image"].shape == (
        args.folds,
        args.batch_size,
        args.image_size,
        args.image_size,
        1,
    )
    return time.perf_counter() - started, wait

  warmup_s = epoch(0, 0)[0]
  timed = range(1, args.epochs + 1)
  throughput = [epoch(e, 0)[0] for e in timed]
  # The epochs run on in sequence, as in training (a pipeline may prefetch across them).
  paced = [epoch(e, args.step_seconds)[1] for e in range(args.epochs + 1, 2 * args.epochs + 1)]
  return {
      "build_s": build_s,
      "warmup_epoch_s": warmup_s,
      "steps_per_epoch": steps,
      "epoch_s": throughput,
      "step_seconds": args.step_seconds,
      "host_wait_s": paced,
  }


def bench_device(config, data, fold_of, spec, args) -> dict:
  import jax
  from saltjax.input_pipeline import on_device

  config = config.copy_and_resolve_references()
  config.augment = spec
  config.image_size = args.image_size
  device_data = on_device.put_on_device(data.train_images, data.train_masks)
  folds = on_device.fold_indices(fold_of, list(range(args.folds)), seed=config.seed)
  steps = _steps([int(s) for s in folds.sizes], args.batch_size, args.max_steps)
  batch_fn = jax.jit(on_device.make_train_batch_fn(config, args.batch_size))

  started = time.perf_counter()
  compiled = batch_fn.lower(device_data, folds, 0, 0).compile()
  compile_s = time.perf_counter() - started

  def epoch(e):
    started = time.perf_counter()
    for step in range(steps):
      batch = compiled(device_data, folds, e, step)
      jax.block_until_ready(batch)
    assert batch["image"].shape == (
        args.folds,
        args.batch_size,
        args.image_size,
        args.image_size,
        1,
    )
    return time.perf_counter() - started

  warmup_s = epoch(0)
  return {
      "compile_s": compile_s,
      "warmup_epoch_s": warmup_s,
      "steps_per_epoch": steps,
      "epoch_s": [epoch(e) for e in range(1, args.epochs + 1)],
  }


def _tensorflow_version() -> str | None:
  try:
    import tensorflow as tf

    return tf.__version__
  except ImportError:
    return None


def _config(args):
  """The config to time, and the temporary cache directory to clean up (or None)."""
  config = importlib.import_module(f"configs.{args.config}").get_config()
  config.use_tfds = False  # read the PNGs directly: no TensorFlow needed
  config.num_folds = max(config.num_folds, args.folds)
  if args.num_train:
    config.synthetic.num_train = args.num_train
  config.synthetic.num_test = 0
  tmp = None
  if args.cache_dir:
    config.cache_dir = args.cache_dir
  else:
    tmp = tempfile.TemporaryDirectory(prefix="saltjax-bench-")
    config.cache_dir = tmp.name
  return config, tmp


def _load(config, args):
  """The training data and each image's fold."""
  from saltjax.data import dataset as data_lib

  started = time.perf_counter()
  data = data_lib.load(config, load_test=False)
  fold_of = data_lib.fold_assignment(config, data)["fold"].to_numpy()
  print(
      f"{len(data.train_images)} training images loaded in"
      f" {time.perf_counter() - started:.1f}s; {args.folds} folds x {args.batch_size}"
      f" at {args.image_size} px",
      flush=True,
  )
  return data, fold_of


def _result_header(args, config, data, tf_version) -> dict:
  """The result's record of the run: host, device, versions, settings; no rows yet."""
  import jax

  device = jax.devices()[0]
  return {
      "benchmark": "saltjax input for F folds at once (benchmarks/input_pipeline_folds.py)",
      "label": args.label,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "host": {
          "cpus_usable": len(os.sched_getaffinity(0)),
          "cpu_count": os.cpu_count(),
          "node": platform.node(),
          "load_average_before": os.getloadavg(),
      },
      "device": {
          "platform": device.platform,
          "kind": device.device_kind,
          "count": jax.device_count(),
      },
      "versions": {
          "python": platform.python_version(),
          "jax": jax.__version__,
          "tensorflow": tf_version,
      },
      "settings": {
          "config": args.config,
          "folds": args.folds,
          "batch_size": args.batch_size,
          "image_size": args.image_size,
          "resize_mode": config.resize_mode,
          "num_images": len(data.train_images),
          "timed_epochs": args.epochs,
          "max_steps": args.max_steps,
      },
      "results": [],
  }


def _measure(pipeline, spec, config, data, fold_of, args) -> dict:
  """One row: a pipeline timed with one augmentation spec, printed."""
  benches = {"tfdata": bench_tfdata, "device": bench_device}
  row = benches[pipeline](config, data, fold_of, spec, args)
  images = args.folds * args.batch_size * row["steps_per_epoch"]
  per_epoch = [images / s for s in row["epoch_s"]]
  row.update(
      pipeline=pipeline,
      augment=spec,
      images_per_s=images * len(row["epoch_s"]) / sum(row["epoch_s"]),
      images_per_s_median_epoch=statistics.median(per_epoch),
      images_per_s_per_epoch=per_epoch,
      steps_per_s=row["steps_per_epoch"] * len(row["epoch_s"]) / sum(row["epoch_s"]),
  )
  extra = f"  compile {row['compile_s']:.1f}s" if "compile_s" in row else ""
  if "host_wait_s" in row:
    extra += f"  host wait/epoch {statistics.median(row['host_wait_s']):.3f}s"
  print(
      f"{pipeline:>7}  {spec:<45} {row['images_per_s']:>7.0f} images/s"
      f"  {row['steps_per_s']:>6.1f} steps/s (median epoch"
      f" {row['images_per_s_median_epoch']:.0f}){extra}",
      flush=True,
  )
  return row


def main(argv=None) -> dict:
  args = parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import jax
  import report

  tf_version = _tensorflow_version()
  pipelines = [p for p in args.pipelines if p != "tfdata" or tf_version]
  if len(pipelines) < len(args.pipelines):
    print("TensorFlow is not installed: the tfdata pipeline is skipped", flush=True)

  config, tmp = _config(args)
  data, fold_of = _load(config, args)
  result = _result_header(args, config, data, tf_version)
  for spec in args.augment:
    for pipeline in pipelines:
      result["results"].append(_measure(pipeline, spec, config, data, fold_of, args))
  result["host"]["load_average_after"] = os.getloadavg()
  if tmp is not None:
    tmp.cleanup()
  stem = (
      f"input_pipeline_folds{args.folds}x{args.batch_size}_{args.image_size}px_"
      f"{report.slug(jax.devices()[0].platform)}{result['host']['cpus_usable']}"
  )
  report.write_result(result, args.output, stem)
  return result


if __name__ == "__main__":
  main()

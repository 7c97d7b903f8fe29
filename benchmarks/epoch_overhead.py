"""Seconds per epoch spent outside the train steps, at the full fold.py model size, on CPU.

What decides whether a GPU stays busy can be measured without one: every
second an epoch spends on checkpoints, validation bookkeeping, iterator start
and logging is a second the accelerator waits. This runs the real training
loop (`train.train_folds`, F folds together) with configs/fold.py's
ResNet50-scSE U-Net (36.4M parameters, its Adam moments: 436 MB of state per
fold) on data made tiny (32 px, a few steps per epoch), and splits each
epoch's wall time into: the train steps and the validation forward passes
(each ended by `block_until_ready`), checkpoint writes on the hot path, the
device-side model selection (best / snapshot / weight average: jitted array
selections that take microseconds on a GPU but run on these same cores here),
and the rest, the host's own work (iterators, bookkeeping, logging).

Two settings of the same code:
- `before`: the resume point written every epoch, synchronously, as the loop
  did before the speed work (`checkpoint_every_seconds=0`, orbax synchronous);
- `after`: the defaults (`checkpoint_every_seconds=300`, asynchronous writes).

The per-epoch overhead of a 150-epoch run is projected from the measured
parts: the host work every epoch pays, plus the resume-point writes that run
makes (one every `checkpoint_every_seconds` of an H100 epoch estimate, and the
final one) spread over its 150 epochs.

  JAX_PLATFORMS=cpu python benchmarks/epoch_overhead.py            # ~10 min on 2 cores
  JAX_PLATFORMS=cpu python benchmarks/epoch_overhead.py --folds 2 --epochs 4   # quicker
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import report  # noqa: E402  (beside this script)


def _config(args, cache_dir: str, cadence: int):
  from configs import fold

  config = fold.get_config()
  config.model.pretrained = ""  # the weights' values do not change the timings
  config.num_folds = args.folds
  config.fold = -1
  config.parallel_folds = 0
  config.image_size = 32
  config.batch_size = args.batch_size
  config.eval_batch_size = 2
  config.synthetic.num_train = args.folds * 4 // 2 * 2 + args.folds * args.batch_size
  config.synthetic.num_test = 2
  config.num_epochs = args.epochs
  config.schedule.cycle_epochs = max(1, args.epochs // 2)
  config.checkpoint_every_seconds = cadence
  config.cache_dir = cache_dir
  config.compilation_cache = os.path.join(cache_dir, "jax_cache")
  config.progress = False
  config.log_every_steps = 1
  return config


def _timed(fn, bucket: list):
  def wrapped(*a, **k):
    started = time.perf_counter()
    out = jax.block_until_ready(fn(*a, **k))
    bucket.append(time.perf_counter() - started)
    return out

  return wrapped


def measure(args, setting: str, job_cache: dict) -> dict:
  """One run of the real loop; each epoch's time split into steps, validation,
  checkpoint writes and the rest (the overhead asked about)."""
  from saltjax import checkpoints as ckpt_lib
  from saltjax import data as data_lib
  from saltjax import parallel, run, train

  cadence = 0 if setting == "before" else 300
  config = _config(args, args.cache_dir, cadence)
  run.enable_compilation_cache(config)
  data = data_lib.load(config)
  mesh = parallel.create_mesh()
  steps, validations, saves, epoch_starts, updates = [], [], [], [], []
  with tempfile.TemporaryDirectory(dir=args.workdir_parent) as workdir:
    workdir = pathlib.Path(workdir)
    fold_of = data_lib.folds_for_run(config, data, workdir)
    if "job" not in job_cache:
      started = time.perf_counter()
      job_cache["job"] = train.Job.create(config, mesh, fold_of, writer=None)
      job_cache["create_s"] = time.perf_counter() - started
    job = job_cache["job"]
    job = train.Job(
        **{
            **job.__dict__,
            "config": config,
            "train_steps": {k: _timed(f, steps) for k, f in job.train_steps.items()},
            "validate_fn": _timed(job.validate_fn, validations),
        }
    )
    originals = (
        train._save,
        train._run_epoch,
        ckpt_lib.FoldCheckpoints.__init__,
        train._update_models,
    )

    def timed_save(group, epoch):
      started = time.perf_counter()
      originals[0](group, epoch)
      saves.append((len(epoch_starts), time.perf_counter() - started))

    def timed_epoch(job, group, feeder, epoch):
      epoch_starts.append(time.perf_counter())
      return originals[1](job, group, feeder, epoch)

    def timed_update(job, group, *a):
      # The best / snapshot / average selection runs on the device: on a CPU
      # that is the same cores, so it is timed apart from the host's work.
      started = time.perf_counter()
      originals[3](job, group, *a)
      jax.block_until_ready((group.best, group.swa))
      updates.append(time.perf_counter() - started)

    def init(self, fold_dir, config, asynchronous=False):
      # `before`: every epoch, synchronously, as the loop wrote them before.
      originals[2](self, fold_dir, config, asynchronous=(setting == "after"))

    train._save, train._run_epoch, ckpt_lib.FoldCheckpoints.__init__, train._update_models = (
        timed_save,
        timed_epoch,
        init,
        timed_update,
    )
    try:
      started = time.perf_counter()
      train.train_folds(job, workdir, list(range(config.num_folds)), data, fold_of)
      finished = time.perf_counter()
    finally:
      (
          train._save,
          train._run_epoch,
          ckpt_lib.FoldCheckpoints.__init__,
          train._update_models,
      ) = originals
    state_bytes = sum(
        p.stat().st_size for p in (workdir / "fold_0" / "latest").rglob("*") if p.is_file()
    )
  epochs = config.num_epochs
  per_step = len(steps) // epochs
  per_val = len(validations) // epochs
  rows = []
  # Epochs 2 .. N-1: compiled, not the last (whose end writes everything).
  for e in range(1, epochs - 1):
    wall = epoch_starts[e + 1] - epoch_starts[e]
    step_s = sum(steps[e * per_step : (e + 1) * per_step])
    val_s = sum(validations[e * per_val : (e + 1) * per_val])
    save_s = sum(t for at, t in saves if at == e + 1)
    update_s = updates[e]
    rows.append(
        {
            "epoch": e + 1,
            "wall_s": round(wall, 4),
            "steps_s": round(step_s, 4),
            "validation_s": round(val_s, 4),
            "checkpoint_s": round(save_s, 4),
            "model_selection_s": round(update_s, 4),
            "other_s": round(wall - step_s - val_s - save_s - update_s, 4),
        }
    )
  final_save = saves[-1][1]
  return {
      "setting": setting,
      "checkpoint_every_seconds": cadence,
      "epochs": epochs,
      "folds": config.num_folds,
      "setup_and_first_epoch_s": round(epoch_starts[1] - started, 3),
      "end_of_training_s": round(finished - epoch_starts[-1], 3),
      "steady_epochs": rows,
      "checkpoint_per_epoch_s": round(float(np.mean([r["checkpoint_s"] for r in rows])), 4),
      "model_selection_per_epoch_s": round(
          float(np.mean([r["model_selection_s"] for r in rows])), 4
      ),
      "other_per_epoch_s": round(float(np.mean([r["other_s"] for r in rows])), 4),
      "final_save_s": round(final_save, 3),
      "latest_bytes_per_fold": state_bytes,
  }


def project(before: dict, after: dict, epochs: int, h100_epoch_s: float) -> dict:
  """Overhead per epoch of an `epochs`-epoch run, from the measured parts."""
  run_seconds = epochs * h100_epoch_s
  after_saves = 1 + math.floor(run_seconds / 300)
  return {
      "epochs": epochs,
      "assumed_h100_epoch_s": h100_epoch_s,
      "before_per_epoch_s": round(
          before["other_per_epoch_s"] + before["checkpoint_per_epoch_s"], 4
      ),
      "after_saves": after_saves,
      "after_per_epoch_s": round(
          after["other_per_epoch_s"] + after_saves * after["final_save_s"] / epochs, 4
      ),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--folds", type=int, default=5)
  parser.add_argument("--epochs", type=int, default=6)
  parser.add_argument("--batch_size", type=int, default=2)
  parser.add_argument(
      "--h100_epoch_s",
      type=float,
      default=1.5,
      help="an H100 epoch of the seed recipe (issue measurement: 1-2 s)",
  )
  parser.add_argument("--cache_dir", default=os.path.expanduser("~/.cache/saltjax"))
  parser.add_argument("--workdir_parent", default=None)
  parser.add_argument("--output", default=None)
  parser.add_argument("--settings", default="before,after", help="which settings to run")
  args = parser.parse_args()
  from saltjax import run

  run.set_up_process()
  job_cache: dict = {}
  rows = [measure(args, setting, job_cache) for setting in args.settings.split(",")]
  if len(rows) < 2:
    print(json.dumps(rows, indent=1))
    return
  for row in rows:
    print(
        f"{row['setting']:>7}: checkpoints {row['checkpoint_per_epoch_s']:.3f} s/epoch,"
        f" model selection (device work) {row['model_selection_per_epoch_s']:.3f} s/epoch,"
        f" other host work {row['other_per_epoch_s']:.4f} s/epoch; final write"
        f" {row['final_save_s']:.2f} s"
    )
  projection = project(rows[0], rows[1], 150, args.h100_epoch_s)
  print(
      f"150-epoch run: before {projection['before_per_epoch_s']:.3f} s/epoch, after"
      f" {projection['after_per_epoch_s']:.3f} s/epoch"
  )
  result = {
      "benchmark": "epoch_overhead",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": f"{jax.devices()[0].platform} ({os.cpu_count()} cores)",
      "host": platform.machine(),
      "versions": report.versions(("jax", "jaxlib", "flax", "orbax-checkpoint")),
      "git_commit": report.git_commit(),
      "model": "configs/fold.py ResNet50-scSE U-Net (32 px, tiny data)",
      "job_create_s": round(job_cache["create_s"], 1),
      "rows": rows,
      "projection_150_epochs": projection,
  }
  report.write_result(result, args.output, "epoch_overhead_cpu")


if __name__ == "__main__":
  main()

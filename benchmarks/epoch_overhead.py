"""Seconds per epoch outside the train steps, for each input path, at the full fold.py model size.

What decides whether a GPU stays busy can be measured without one: every
second the host spends between programs (making or stacking batches,
dispatching, bookkeeping, logging) is a second an accelerator waits. This
runs the real training loop (`loop.train_folds`, 5 folds together) with
configs/fold.py's ResNet50-scSE U-Net (36.4M parameters; 436 MB of state per
fold) on data made tiny (32 px), for each input path ('device': an epoch is
one program; 'tfdata': one program a step plus one for the epoch's end), at
two numbers of steps per epoch, S1 and S2. For each epoch after the first
(which compiles) and before the last (which writes the checkpoints):

- wall: the epoch's seconds;
- host: wall minus the time the host spent waiting for the device's results
  (the epoch's one `jax.device_get`): the host's own work in the epoch,
  dispatches included. On a CPU the "device" is the same cores, so a step's
  compute can also show up as host time where a dispatch waits for a free
  core: these are upper bounds.

A straight line through the two settings splits each into a part per step
and a fixed part per epoch (intercept): `fixed_per_epoch_s` (wall: host work
plus the validation forward pass and the model selection, which a GPU does in
milliseconds) and `host_outside_steps_per_epoch_s` (host) — the issue's
targets are <= 0.5 s and <= 0.1 s — and `host_per_step_s`.

  JAX_PLATFORMS=cpu python benchmarks/epoch_overhead.py          # ~15 min on 2 cores
  JAX_PLATFORMS=cpu python benchmarks/epoch_overhead.py --fold_strategies=in_turn,vmap
  JAX_PLATFORMS=cpu python benchmarks/epoch_overhead.py --tiny   # quick config model
"""

from __future__ import annotations

import argparse
import json
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


def _config(args, pipeline: str, steps: int, strategy: str):
  from configs import fold, quick

  config = (quick if args.tiny else fold).get_config()
  config.model.pretrained = ""  # the weights' values do not change the timings
  config.num_folds = args.folds
  config.fold = -1
  config.parallel_folds = 0
  config.fold_strategy = strategy
  config.image_size = 32
  config.batch_size = args.batch_size
  config.eval_batch_size = args.batch_size
  # About `steps` full batches in every fold's training side.
  config.synthetic.num_train = args.folds * steps * args.batch_size // (args.folds - 1) + 1
  config.synthetic.num_test = 2
  config.num_epochs = args.epochs
  config.schedule.cycle_epochs = args.epochs * 10  # no snapshot copies mid-run
  config.input_pipeline = pipeline
  config.use_tfds = pipeline != "device"
  config.cache_dir = args.cache_dir
  config.compilation_cache = os.path.join(args.cache_dir, "jax_cache")
  config.progress = False
  config.log_every_steps = 1
  return config


def measure(args, pipeline: str, steps: int, strategy: str) -> dict:
  """One run of the real loop; each steady epoch's wall and host seconds."""
  from saltjax.data import dataset as data_lib
  from saltjax import parallel
  from saltjax.app import process
  from saltjax.training import loop
  from saltjax.training.job import Job

  config = _config(args, pipeline, steps, strategy)
  process.enable_compilation_cache(config)
  data = data_lib.load(config)
  mesh = parallel.create_mesh()
  epoch_starts, waits = [], []
  with tempfile.TemporaryDirectory(dir=args.workdir_parent) as workdir:
    workdir = pathlib.Path(workdir)
    fold_of = data_lib.folds_for_run(config, data, workdir)
    started = time.perf_counter()
    job = Job.create(config, mesh, fold_of, writer=None)
    create_s = time.perf_counter() - started
    run_epoch, device_get = loop._run_epoch, jax.device_get

    def timed_epoch(*a):
      epoch_starts.append(time.perf_counter())
      return run_epoch(*a)

    def timed_get(x):
      started = time.perf_counter()
      out = device_get(x)
      waits.append((len(epoch_starts), time.perf_counter() - started))
      return out

    loop._run_epoch, jax.device_get = timed_epoch, timed_get
    try:
      loop.train_folds(job, workdir, list(range(config.num_folds)), data, fold_of)
      finished = time.perf_counter()
    finally:
      loop._run_epoch, jax.device_get = run_epoch, device_get
  rows = []
  for e in range(1, config.num_epochs - 1):  # compiled, and not the last (checkpoints)
    wall = epoch_starts[e + 1] - epoch_starts[e]
    wait = sum(t for at, t in waits if at == e + 1)
    rows.append({"epoch": e + 1, "wall_s": round(wall, 4), "host_s": round(wall - wait, 4)})
  return {
      "input_pipeline": pipeline,
      "fold_strategy": strategy,
      "steps_per_epoch": job.steps_per_epoch,
      "images_per_step": config.batch_size * config.num_folds,
      "job_create_s": round(create_s, 2),
      "compile_s": {name: round(p.compile_seconds, 2) for name, p in job.programs.items()},
      "programs_per_epoch": sum(p.calls for p in job.programs.values()) / config.num_epochs,
      "setup_and_first_epoch_s": round(epoch_starts[1] - started, 2),
      "end_of_training_s": round(finished - epoch_starts[-1], 2),
      "steady_epochs": rows,
      "wall_per_epoch_s": round(float(np.median([r["wall_s"] for r in rows])), 4),
      "host_per_epoch_s": round(float(np.median([r["host_s"] for r in rows])), 4),
  }


def split(short: dict, long: dict) -> dict:
  """The line through (steps, seconds) of two runs: per step, and fixed per epoch."""
  ds = long["steps_per_epoch"] - short["steps_per_epoch"]
  out = {}
  for name, key in (("wall", "wall_per_epoch_s"), ("host", "host_per_epoch_s")):
    per_step = (long[key] - short[key]) / ds
    out[f"{name}_per_step_s"] = round(per_step, 4)
    out[f"{name}_fixed_per_epoch_s"] = round(short[key] - short["steps_per_epoch"] * per_step, 4)
  return {
      "input_pipeline": short["input_pipeline"],
      "fold_strategy": short["fold_strategy"],
      "fixed_per_epoch_s": out["wall_fixed_per_epoch_s"],
      "host_outside_steps_per_epoch_s": out["host_fixed_per_epoch_s"],
      "host_per_step_s": out["host_per_step_s"],
      "wall_per_step_s": out["wall_per_step_s"],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--folds", type=int, default=5)
  parser.add_argument("--epochs", type=int, default=4)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--steps", default="1,3", help="two numbers of steps per epoch")
  parser.add_argument("--pipelines", default="device,tfdata")
  parser.add_argument(
      "--fold_strategies", default="in_turn", help="config.fold_strategy values: in_turn,vmap"
  )
  parser.add_argument("--tiny", action="store_true", help="configs/quick.py's model (a smoke run)")
  parser.add_argument("--cache_dir", default=os.path.expanduser("~/.cache/saltjax"))
  parser.add_argument("--workdir_parent", default=None)
  parser.add_argument("--output", default=None)
  args = parser.parse_args()
  from saltjax.app import process

  process.set_up_process()
  s1, s2 = (int(s) for s in args.steps.split(","))
  runs, splits = [], []
  for strategy in args.fold_strategies.split(","):
    for pipeline in args.pipelines.split(","):
      short, long = measure(args, pipeline, s1, strategy), measure(args, pipeline, s2, strategy)
      runs += [short, long]
      splits.append(split(short, long))
      print(json.dumps(splits[-1]))
  print("\n| folds | input | fixed s/epoch | host s/epoch outside steps | host s/step | s/step |")
  print("| --- | --- | --- | --- | --- | --- |")
  for s in splits:
    print(
        f"| {s['fold_strategy']} | {s['input_pipeline']} | {s['fixed_per_epoch_s']:.3f} |"
        f" {s['host_outside_steps_per_epoch_s']:.3f} | {s['host_per_step_s']:.4f} |"
        f" {s['wall_per_step_s']:.3f} |"
    )
  result = {
      **report.cpu_header(
          "epoch_overhead", ("jax", "jaxlib", "flax", "orbax-checkpoint", "tensorflow")
      ),
      "host": platform.machine(),
      "model": "configs/%s.py model (32 px, tiny data)" % ("quick" if args.tiny else "fold"),
      "folds": args.folds,
      "batch_size_per_fold": args.batch_size,
      "splits": splits,
      "runs": runs,
  }
  report.write_result(result, args.output, "epoch_overhead_cpu")


if __name__ == "__main__":
  main()

"""Seconds per step of the device epoch (one scanned program) against the step program, on this CPU.

The device input path runs an epoch as one program: a `lax.scan` over the
steps, each making its F batches on the device and running the train step
(`steps.make_device_epoch_fn`). The tf.data path runs the step program once
a step. Both train the same model on the same kind of batches; this times
one step of each, on the same machine in the same run:

- device: the epoch program at S1 and S2 steps (the same held-out batch);
  (seconds at S2 - seconds at S1) / (S2 - S1) is one scanned step;
- step: the on-device batch function (jitted alone) plus the step program,
  back to back, per step.

for each fold strategy (config.fold_strategy). configs/fold.py's full model
(36.4M parameters a fold, 5 folds) on 32 px images; a CPU measurement, not
an accelerator's.

  JAX_PLATFORMS=cpu python benchmarks/scan_cost_cpu.py              # ~10 min on 2 cores
  JAX_PLATFORMS=cpu python benchmarks/scan_cost_cpu.py --tiny       # configs/quick.py's model
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from benchmarks import report  # noqa: E402


def _config(args, strategy: str):
  from configs import fold, quick

  config = fold.get_config()
  if args.tiny:
    config.model = quick.get_config().model
  config.model.pretrained = ""  # the weights' values do not change the timings
  config.image_size = args.image_size
  config.batch_size = config.eval_batch_size = args.batch_size
  config.use_tfds = False
  config.fold_strategy = strategy
  config.synthetic.num_train, config.synthetic.num_test = 200, 8
  config.cache_dir = args.cache_dir
  return config


def _seconds(fn, repeats: int) -> float:
  import jax

  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - started)
  return min(times)


def measure(args, strategy: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from saltjax import parallel
  from saltjax.data import dataset as data_lib
  from saltjax.input_pipeline import on_device
  from saltjax.training import feeders
  from saltjax.training import steps as steps_lib
  from saltjax.training.job import Job
  from saltjax.training.state import stack_folds

  config = _config(args, strategy)
  data = data_lib.load(config)
  fold_of = data_lib.fold_assignment(config, data)["fold"].to_numpy()
  mesh = parallel.create_mesh()
  job = Job.create(config, mesh, fold_of, None)
  repl = parallel.replicated(mesh)
  folds = list(range(config.num_folds))
  indices = jax.device_put(on_device.fold_indices(fold_of, folds, seed=config.seed), repl)
  images = on_device.put_on_device(
      data.train_images, data.train_masks.astype(np.uint8), sharding=repl
  )
  val = tuple(x[:1] for x in feeders.validation_data(config, data, folds, fold_of, mesh))
  val_counts = jax.device_put(np.ones(len(folds), np.float32), repl)
  scalars = (jnp.int32(0), jnp.float32(0), jnp.bool_(False))

  def fresh_state():
    return job.place_state(stack_folds([job.new_state() for _ in folds]))

  row = {"fold_strategy": strategy, "folds": len(folds), "batch_size_per_fold": args.batch_size}
  s1, s2 = args.steps
  epoch_s = {}
  for steps in (s1, s2):
    program = dataclasses.replace(job, steps_per_epoch=steps, programs={}).device_epoch_program(
        config.loss.name
    )
    state = fresh_state()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    models = steps_lib.ModelsInMemory(
        jax.tree.map(jnp.copy, variables),
        jnp.full((len(folds),), 2.0),  # no fold improves: no best-model copies
        jax.tree.map(jnp.copy, variables),
    )
    carried = [state, models]

    def epoch():
      out = program(*carried, images, indices, val, val_counts, *scalars)
      carried[:] = out[:2]
      return out

    jax.block_until_ready(epoch())  # compiles
    epoch_s[steps] = _seconds(epoch, args.repeats)
  row["device_epoch_s"] = {str(k): round(v, 4) for k, v in epoch_s.items()}
  row["device_s_per_step"] = round((epoch_s[s2] - epoch_s[s1]) / (s2 - s1), 4)

  batch_fn = jax.jit(on_device.make_train_batch_fn(config, config.batch_size))
  step = job.train_step_program(config.loss.name)
  carried = {"state": fresh_state(), "steps": 0}

  def one_step():
    carried["steps"] += 1
    batch = batch_fn(images, indices, 0, carried["steps"] % s1)
    carried["state"], metrics = step(carried["state"], batch)
    return metrics

  jax.block_until_ready(one_step())  # compiles
  row["step_s_per_step"] = round(_seconds(one_step, args.repeats * s2), 4)
  row["device_over_step"] = round(row["device_s_per_step"] / row["step_s_per_step"], 3)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--fold_strategies", default="in_turn,vmap")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--batch_size", type=int, default=8, help="per fold")
  parser.add_argument("--steps", default="1,3", help="two epoch lengths S1,S2")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--tiny", action="store_true", help="configs/quick.py's model")
  parser.add_argument("--cache_dir", default=os.path.expanduser("~/.cache/saltjax"))
  parser.add_argument("--output", default=None)
  args = parser.parse_args()
  args.steps = tuple(int(s) for s in args.steps.split(","))
  rows = []
  for strategy in args.fold_strategies.split(","):
    rows.append(measure(args, strategy))
    print(rows[-1], flush=True)
  print("\n| folds | s/step, device epoch | s/step, step program | device / step |")
  print("| --- | ---: | ---: | ---: |")
  for r in rows:
    print(
        f"| {r['fold_strategy']} | {r['device_s_per_step']:.3f} | {r['step_s_per_step']:.3f}"
        f" | {r['device_over_step']:.2f} |"
    )
  result = {
      **report.cpu_header("scan_cost_cpu", ("jax", "jaxlib", "flax", "optax")),
      "model": "configs/%s.py model" % ("quick" if args.tiny else "fold"),
      "settings": {k: v for k, v in vars(args).items() if k != "output"},
      "rows": rows,
  }
  stem = "scan_cost_cpu_tiny" if args.tiny else "scan_cost_cpu"
  report.write_result(result, args.output, stem)


if __name__ == "__main__":
  main()

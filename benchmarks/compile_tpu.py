"""The train step compiled for TPU slices on this CPU: bytes and FLOPs per image, memory per chip.

Deviceless ahead-of-time compilation (saltjax.app.compile_only's programs,
XLA's TPU compiler from libtpu): deterministic figures of the program the
slice would run, with no TPU. The recipe's step is bound by memory traffic,
so bytes per image-step is the figure to lower: every byte the step's
instructions read and write, in HBM and on chip, loops counted as they run
(saltjax.app.hlo_traffic), and the HBM part of them.

Three ways to train F folds, at configs/tpu.py's sizes (ResNet50-scSE U-Net,
bfloat16, 128 px) unless told otherwise:
  vmap      the F folds at once, one program (config.fold_strategy='vmap':
            every conv a grouped conv)
  in_turn   the F folds one after another inside one program
            (config.fold_strategy='in_turn': lax.map over the fold axis)
  one_model one model at batch F x batch_size: the reference, what the same
            images cost without a fold axis
  one_pass  one model at batch_size: one iteration of in_turn's loop alone
            (--strategies=one_pass; not among the defaults)

  python benchmarks/compile_tpu.py --slices=v5e-8 --batch_sizes=256,32
  python benchmarks/compile_tpu.py --tiny     # the same at test size (minutes)

Each compile of the full-size step takes minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from benchmarks import report  # noqa: E402

STRATEGIES = ("vmap", "in_turn", "one_model")
ALSO = ("one_pass",)
# A v5e chip's clock, to read the compiler's cycle estimates as time: one
# TensorCore with 4 MXUs of 128 x 128 multiply-adds a cycle, at 197 TFLOP/s
# (https://cloud.google.com/tpu/docs/v5e): 1.5 GHz. Other generations' rows
# give cycles only.
CLOCK_HZ = {"v5e": 197e12 / (4 * 128 * 128 * 2)}
# The TGS training set: 5 folds x 152 epochs x 3,200 images a fold's epoch.
TGS_TRAIN, TGS_TEST = 4000, 18000


def _config(
    strategy: str,
    batch_size: int,
    tiny: bool,
    cache_dir: str,
    state_sharding=None,
    final_block=None,
):
  from configs import tpu

  config = tpu.get_config()
  config.cache_dir = cache_dir
  config.use_tfds = False  # the layout read with OpenCV: no TFDS preparation
  config.model.pretrained = ""  # shapes only
  config.synthetic.num_train, config.synthetic.num_test = TGS_TRAIN, TGS_TEST
  if tiny:  # configs/quick.py's model, data and epochs
    from configs import quick

    small = quick.get_config()
    for key in ("model", "synthetic", "image_size", "num_folds", "num_epochs", "schedule"):
      config[key] = small[key]
  config.batch_size = batch_size
  if state_sharding:
    config.state_sharding = state_sharding
  if final_block:
    config.model.final_block = final_block
  if strategy in ("one_model", "one_pass"):
    config.parallel_folds, config.fold = 1, 0
    config.batch_size = batch_size * (config.num_folds if strategy == "one_model" else 1)
  else:
    config.parallel_folds, config.fold_strategy = 0, strategy
  return config


def _compiled(accelerator: str, config, kinds) -> tuple:
  """(the slice, the compile report of the job's programs of `kinds`, the job's facts)."""
  from saltjax.app import compile_programs
  from saltjax.app import compile_report
  from saltjax.app import tpu_slices
  from saltjax.data import dataset as data_lib

  spec = tpu_slices.slice_spec(accelerator)
  devices = tpu_slices.compile_only_devices(spec)
  programs, facts = compile_programs.job_programs(
      config, devices, data_lib.load(config), kinds=kinds
  )
  return spec, compile_report.build(spec, programs, facts, {}), facts


def _measure(
    accelerator: str,
    strategy: str,
    batch_size: int,
    tiny: bool,
    cache_dir: str,
    state_sharding=None,
    final_block=None,
):
  config = _config(strategy, batch_size, tiny, cache_dir, state_sharding, final_block)
  spec, result, facts = _compiled(accelerator, config, ("train",))
  step = result["programs"][0]
  # Every fold's image-steps of the whole job at batch_size per fold (each
  # epoch's whole batches of the smallest fold), at this step's cost per image.
  fold_images = facts["training_images_smallest_fold"] // batch_size * batch_size
  image_steps = config.num_folds * config.num_epochs * fold_images
  seconds_per_image = step["bound_seconds"] / step["images_per_chip"] / spec.chips
  clock = CLOCK_HZ.get(spec.generation)
  estimated_seconds = step["estimated_cycles_per_chip"] / clock if clock else None
  return {
      "accelerator": accelerator,
      "strategy": strategy,
      "state_sharding": config.state_sharding,
      "final_block": facts["model_final_block"],
      "batch_size_per_fold": batch_size,
      "folds": config.num_folds,
      "images_per_step": facts["images_per_chip_per_step"] * spec.chips,
      "images_per_chip": step["images_per_chip"],
      "compile_seconds": round(step["compile_seconds"], 1),
      "flops_per_image": step["flops_per_image"],
      "bytes_per_image": step["bytes_per_image"],
      "hbm_bytes_per_image": step["hbm_bytes_per_image"],
      "on_chip_bytes_per_image": step["on_chip_bytes_per_chip"] / step["images_per_chip"],
      # XLA's own count, each loop body once: the in-turn step's fold loop counted once.
      "xla_bytes_accessed_per_image": step["xla_bytes_accessed_per_chip"] / step["images_per_chip"],
      "hbm_bytes_per_image_by_kind": _per_image(step["hbm_bytes_by_kind"], step),
      "hbm_bytes_per_image_by_phase": _per_image(step["hbm_bytes_by_phase"], step),
      "memory_per_chip": step["memory_per_chip"],
      "bound_ms_per_step": 1e3 * step["bound_seconds"],
      "bound_by": _bound_by(step, spec),
      "image_steps_job": image_steps,
      "train_bound_seconds_job": seconds_per_image * image_steps,
      # The compiler's own estimate (its instructions' cycles summed): no bound.
      "estimated_cycles_per_step": step["estimated_cycles_per_chip"],
      "estimated_ms_per_step": 1e3 * estimated_seconds if clock else None,
      "estimated_train_seconds_job": (
          estimated_seconds / step["images_per_chip"] / spec.chips * image_steps if clock else None
      ),
  }


def _epoch_row(accelerator: str, pipeline: str, batch_size: int, tiny: bool, cache_dir: str):
  """One epoch's programs on an input path: FLOPs and bytes per training image of the epoch."""
  config = _config("in_turn", batch_size, tiny, cache_dir)  # the default fold strategy
  config.input_pipeline = pipeline
  _, result, facts = _compiled(accelerator, config, ("train", "epoch_end"))
  epoch = lambda key: sum(p[key] * p["calls_per_epoch"] for p in result["programs"])
  images = facts["steps_per_epoch"] * facts["images_per_chip_per_step"]
  return {
      "accelerator": accelerator,
      "input_pipeline": pipeline,
      "fold_strategy": config.fold_strategy,
      "batch_size_per_fold": batch_size,
      "folds": config.num_folds,
      "steps_per_epoch": facts["steps_per_epoch"],
      "training_images_per_chip": images,
      "programs": [
          {k: p[k] for k in ("name", "calls_per_epoch", "loop_trips", "compile_seconds")}
          for p in result["programs"]
      ],
      "flops_per_image": epoch("flops_per_chip") / images,
      "bytes_per_image": epoch("bytes_per_chip") / images,
      "hbm_bytes_per_image": epoch("hbm_bytes_per_chip") / images,
      "bound_seconds_epoch": result["bound_seconds_epoch"],
  }


def _per_image(split: dict, step: dict) -> dict:
  return {k: v / step["images_per_chip"] for k, v in split.items()}


def _bound_by(step: dict, spec) -> str:
  arithmetic = step["flops_per_chip"] / spec.peak_flops_per_chip
  traffic = step["hbm_bytes_per_chip"] / spec.hbm_bandwidth_per_chip
  return "memory" if traffic >= arithmetic else "compute"


def _table(rows: list[dict]) -> str:
  lines = [
      "| slice | strategy | state | last block | batch/fold | images/chip | GFLOP/image"
      " | GB/image (all memory) | HBM GB/image | args+temp GiB/chip | bound ms/step | bound"
      " | train bound, job (s) | XLA's estimate ms/step | compile s |",
      "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"
      " ---: | ---: |",
  ]
  for r in rows:
    m = r["memory_per_chip"]
    lines.append(
        f"| {r['accelerator']} | {r['strategy']} | {r.get('state_sharding', 'replicated')}"
        f" | {r.get('final_block', 'plain')}"
        f" | {r['batch_size_per_fold']}"
        f" | {r['images_per_chip']:g} | {r['flops_per_image'] / 1e9:.2f}"
        f" | {r['bytes_per_image'] / 1e9:.3f} | {r['hbm_bytes_per_image'] / 1e9:.3f}"
        f" | {m['argument'] / 2**30:.2f} + {m['temp'] / 2**30:.2f}"
        f" | {r['bound_ms_per_step']:.1f} | {r['bound_by']} | {r['train_bound_seconds_job']:.0f}"
        f" | {_estimate(r)} | {r['compile_seconds']:.0f} |"
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--slices", default="v5e-8")
  parser.add_argument("--strategies", default=",".join(STRATEGIES))
  parser.add_argument("--batch_sizes", default="256,32", help="per fold")
  parser.add_argument(
      "--state_shardings",
      default="",
      help="config.state_sharding values to compile each row with (default: the config's)",
  )
  parser.add_argument(
      "--final_block",
      default="",
      help="config.model.final_block (default: the config's, 'auto': space_to_depth on a TPU)",
  )
  parser.add_argument("--tiny", action="store_true", help="test-size model and data")
  parser.add_argument("--cache_dir", default=os.path.expanduser("~/.cache/saltjax"))
  parser.add_argument("--output", default=None)
  parser.add_argument(
      "--input_paths",
      action="store_true",
      help="instead: one epoch's programs on the tf.data path (a program a step, then the"
      " epoch's end) against the device path's one program an epoch, per training image",
  )
  args = parser.parse_args()
  rows = []
  started = time.time()
  stem = "compile_tpu_tiny" if args.tiny else "compile_tpu"
  if args.input_paths:
    stem += "_input_paths"
    output = args.output or str(report.RESULTS / f"{stem}_{datetime.date.today().isoformat()}.json")
    for accelerator in args.slices.split(","):
      for batch_size in map(int, args.batch_sizes.split(",")):
        for pipeline in ("tfdata", "device"):
          rows.append(_epoch_row(accelerator, pipeline, batch_size, args.tiny, args.cache_dir))
          print({k: v for k, v in rows[-1].items() if k != "programs"}, flush=True)
          report.write_result(_result(args, rows, started), output, stem)
    return
  output = args.output or str(report.RESULTS / f"{stem}_{datetime.date.today().isoformat()}.json")
  for accelerator in args.slices.split(","):
    for batch_size in map(int, args.batch_sizes.split(",")):
      for strategy in args.strategies.split(","):
        if strategy not in STRATEGIES + ALSO:
          parser.error(f"--strategies: {strategy!r} is not one of {', '.join(STRATEGIES + ALSO)}")
        for sharding in args.state_shardings.split(",") if args.state_shardings else [None]:
          rows.append(
              _measure(
                  accelerator,
                  strategy,
                  batch_size,
                  args.tiny,
                  args.cache_dir,
                  sharding,
                  args.final_block,
              )
          )
          print(_table(rows[-1:]).splitlines()[-1], flush=True)
          # Written after every row: a long run cut short keeps what it measured.
          report.write_result(_result(args, rows, started), output, stem)
  print(_table(rows))


def _estimate(row: dict) -> str:
  if row.get("estimated_ms_per_step") is not None:
    return f"{row['estimated_ms_per_step']:.1f}"
  return f"{row.get('estimated_cycles_per_step', 0) / 1e6:.1f} Mcycles"


def _result(args, rows: list[dict], started: float) -> dict:
  return {
      "benchmark": "compile_tpu",
      "device": "compile-only TPU devices (XLA's TPU compiler on this CPU)",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "versions": report.versions(("jax", "jaxlib", "libtpu", "flax", "optax")),
      "git_commit": report.git_commit(),
      "settings": {**vars(args), "config": "configs/tpu.py", "model_dtype": "bfloat16"},
      "seconds": round(time.time() - started, 1),
      "rows": rows,
  }


if __name__ == "__main__":
  main()

"""Training and TTA-inference throughput of saltjax's own train step.

Times the real code path: `job.Job.create` (model, optimiser, initial
variables) and the step from `steps.compile_train_steps`, with configs/fold.py's
model (ResNet50 encoder + scSE U-Net, 128x128 input, bfloat16 compute), on
whatever devices JAX has. The batch is put on the device(s) once: this
measures the accelerator, not the input pipeline (see input_pipeline.py here
for that).

For each batch size:
- trace + lower and compile (XLA) are timed separately from the steps;
- the compiled step runs once more as a warm-up (first execution);
- then `--repeats` timings of `--steps` back-to-back steps each, ended by
  block_until_ready; the median of the repeats is reported as ms/step and
  images/s;
- FLOPs per step come from XLA's own cost analysis of the compiled step
  (forward, backward and optimiser update, as XLA counts them), giving an
  achieved TFLOP/s, reported against a bf16 matmul rate measured on the same
  device (an 8192^3 jnp.dot), which stands in for the attainable peak.
TTA inference (identity + hflip, the validation/prediction function of
saltjax.model.tta) is timed the same way.

Usage:
  python benchmarks/train_throughput.py                       # GPU/TPU run
  python benchmarks/train_throughput.py --batch_sizes 32 128 --repeats 7
  python benchmarks/train_throughput.py --match_peer          # smp's exact net
  python benchmarks/train_throughput.py --tiny                # CPU smoke test

Writes a JSON to benchmarks/results/ (or --output) and prints a table.
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
RESULTS = REPO / "benchmarks" / "results"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
      "--batch_sizes",
      type=int,
      nargs="+",
      default=None,
      help="global batch sizes (default 32 64 128 256 512; --tiny: 8 16)",
  )
  p.add_argument(
      "--folds_together",
      default="",
      help="F x B settings of the F-fold step, e.g. '5x32' (F models, B images each); '5x32:vmap'"
      " or '5x32:in_turn' names the fold strategy (default: the config's)",
  )
  p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
  p.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
  p.add_argument(
      "--dtype",
      default=None,
      choices=("bfloat16", "float32"),
      help="compute dtype (default bfloat16; --tiny: float32)",
  )
  p.add_argument("--tta", default="hflip", help="TTA of the inference timing ('' skips it)")
  p.add_argument(
      "--matmul_size",
      type=int,
      default=None,
      help="n of the n^3 matmul whose rate is the reference (default 8192; --tiny: 1024)",
  )
  p.add_argument(
      "--match_peer",
      action="store_true",
      help="no scSE in the encoder: exactly smp's Unet('resnet50', scse decoder)",
  )
  p.add_argument(
      "--tiny",
      action="store_true",
      help="tiny model at 64x64: a CPU smoke test of this script, not a benchmark",
  )
  p.add_argument(
      "--compilation_cache",
      default="",
      help="JAX persistent compilation cache dir (compile_s then measures a cache hit)",
  )
  p.add_argument("--label", default="", help="free text stored in the JSON")
  p.add_argument("--output", default="", help="JSON path (default benchmarks/results/...)")
  args = p.parse_args(argv)
  if args.batch_sizes is None:
    args.batch_sizes = [8, 16] if args.tiny else [32, 64, 128, 256, 512]
  if args.dtype is None:
    # bfloat16 is emulated on CPU: the tiny smoke test stays in float32.
    args.dtype = "float32" if args.tiny else "bfloat16"
  if args.matmul_size is None:
    args.matmul_size = 1024 if args.tiny else 8192
  if args.tiny:
    args.steps, args.repeats = min(args.steps, 3), min(args.repeats, 3)
  return args


def make_config(args):
  from configs import fold

  config = fold.get_config()
  config.model.dtype = args.dtype
  config.model.pretrained = ""  # timing only: no weights to download
  if args.match_peer:
    config.model.scse_encoder = False
  if args.tiny:
    config.image_size = 64
    config.model.stage_sizes = (1, 1, 1, 1)
    config.model.encoder_width = 8
    config.model.decoder_channels = (32, 16, 16, 8, 8)
    config.model.scse_reduction = 4
  config.batch_size = max(args.batch_sizes + [b for _, b, _ in fold_settings(args)])
  config.eval_batch_size = config.batch_size
  return config


def fold_settings(args) -> list[tuple[int, int, str]]:
  """(folds, batch per fold, fold strategy or '' for the config's) of --folds_together."""
  settings = []
  for setting in args.folds_together.split():
    sizes, _, strategy = setting.partition(":")
    folds, batch = (int(x) for x in sizes.split("x"))
    settings.append((folds, batch, strategy))
  return settings


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
  times = [fn() for _ in range(repeats)]
  return statistics.median(times), times


def matmul_rate(n: int, dtype_name: str, repeats: int = 5, iters: int = 10) -> dict:
  """Measured n^3 matmul rate in TFLOP/s: the reference 'peak' of the device."""
  import jax
  import jax.numpy as jnp

  dtype = jnp.dtype(dtype_name)
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  f = jax.jit(jnp.dot)
  jax.block_until_ready(f(a, b))

  def once():
    t = time.perf_counter()
    for _ in range(iters):
      out = f(a, b)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / iters

  seconds, _ = median_time(once, repeats)
  return {"n": n, "dtype": dtype_name, "seconds": seconds, "tflops": 2.0 * n**3 / seconds / 1e12}


def cost(compiled) -> dict:
  """FLOPs and bytes of a compiled executable, from XLA's cost analysis."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per device program
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return {
      "flops": float(analysis.get("flops", 0.0)) or None,
      "bytes_accessed": float(analysis.get("bytes accessed", 0.0)) or None,
  }


def is_oom(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def bench_train(
    job, batch_size: int, args, peak_tflops: float, folds: int = 1, strategy: str = ""
) -> dict:
  """The real train step: `folds` models, `batch_size` images each, over the folds by `strategy`.

  strategy: config.fold_strategy for this row ('' keeps the config's).
  """
  import jax
  import ml_collections
  import numpy as np
  from saltjax import parallel
  from saltjax.training import steps as steps_lib
  from saltjax.training.state import stack_folds

  config, mesh = job.config, job.mesh
  step = job.train_steps[config.loss.name]
  if strategy and strategy != steps_lib.fold_strategy(config):
    config = ml_collections.ConfigDict(config.to_dict())
    config.fold_strategy = strategy
    step = steps_lib.compile_train_steps(config, mesh, job.state_sharding)[config.loss.name]
  rng = np.random.default_rng(0)
  size = config.image_size
  host = {
      "image": rng.uniform(size=(folds, batch_size, size, size, 1)).astype(np.float32),
      "mask": (rng.uniform(size=(folds, batch_size, size, size)) > 0.7).astype(np.float32),
  }
  batch = parallel.global_from_local(host, mesh, fold_axis=True)
  state = job.place_state(stack_folds([job.new_state() for _ in range(folds)]))
  jax.block_until_ready((state, batch))

  t = time.perf_counter()
  lowered = step.lower(state, batch)
  trace_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  first_step_s = time.perf_counter() - t

  def once():
    nonlocal state
    t = time.perf_counter()
    for _ in range(args.steps):
      state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    return (time.perf_counter() - t) / args.steps

  step_s, all_s = median_time(once, args.repeats)
  costs = cost(compiled)
  row = {
      "folds": folds,
      "batch_size": batch_size,
      "fold_strategy": steps_lib.fold_strategy(config) if folds > 1 else "",
      "trace_s": trace_s,
      "compile_s": compile_s,
      "first_step_s": first_step_s,
      "step_ms": 1e3 * step_s,
      "step_ms_repeats": [1e3 * s for s in all_s],
      "images_per_s": folds * batch_size / step_s,
      **costs,
      "loss_finite": bool(np.all(jax.device_get(metrics["finite"]))),
  }
  if costs["flops"]:
    row["tflops"] = costs["flops"] / step_s / 1e12
    row["fraction_of_matmul_rate"] = row["tflops"] / peak_tflops
  return row


def bench_tta(job, batch_size: int, args, peak_tflops: float) -> dict:
  import jax
  import numpy as np
  from saltjax.model import tta
  from saltjax import parallel

  config, mesh = job.config, job.mesh
  # As saltjax.training.job.Job and saltjax.inference.ensemble build it.
  infer = jax.jit(tta.make_infer_fn(job.model, config.image_size, config.resize_mode, args.tta))
  variables = jax.device_put(job.initial_variables, parallel.replicated(mesh))
  rng = np.random.default_rng(1)
  size = config.image_size
  images = parallel.global_from_local(
      rng.uniform(size=(batch_size, size, size, 1)).astype(np.float32), mesh
  )
  t = time.perf_counter()
  compiled = infer.lower(variables, images).compile()
  compile_s = time.perf_counter() - t
  jax.block_until_ready(compiled(variables, images))

  def once():
    t = time.perf_counter()
    for _ in range(args.steps):
      out = compiled(variables, images)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / args.steps

  step_s, all_s = median_time(once, args.repeats)
  costs = cost(compiled)
  row = {
      "batch_size": batch_size,
      "compile_s": compile_s,
      "step_ms": 1e3 * step_s,
      "step_ms_repeats": [1e3 * s for s in all_s],
      "images_per_s": batch_size / step_s,
      **costs,
  }
  if costs["flops"]:
    row["tflops"] = costs["flops"] / step_s / 1e12
    row["fraction_of_matmul_rate"] = row["tflops"] / peak_tflops
  return row


def guarded(fn, *a) -> dict:
  """Runs one measurement; an out-of-memory batch size is recorded, not fatal."""
  try:
    return fn(*a)
  except Exception as e:  # XlaRuntimeError has no stable import path
    if not is_oom(e):
      raise
    return {"batch_size": a[1], "error": "out of memory: " + str(e).splitlines()[0][:300]}


def versions() -> dict:
  return report.versions(
      (
          "jax",
          "jaxlib",
          "flax",
          "optax",
          "numpy",
          "jax-cuda12-plugin",
          "jax-cuda13-plugin",
          "libtpu",
      )
  )


def print_table(title: str, rows: list[dict]) -> None:
  print(f"\n{title}")
  print(
      f"{'folds':>5} {'batch':>6} {'images/s':>10} {'ms/step':>9} {'TFLOP/s':>8} {'of matmul':>9}"
      f" {'compile s':>9}"
  )
  for r in rows:
    if "error" in r:
      print(f"{r.get('folds', 1):>5} {r['batch_size']:>6}  {r['error'][:70]}")
      continue
    tf = f"{r['tflops']:.3g}" if r.get("tflops") else "-"
    frac = f"{100 * r['fraction_of_matmul_rate']:.0f}%" if r.get("tflops") else "-"
    print(
        f"{r.get('folds', 1):>5} {r['batch_size']:>6} {r['images_per_s']:>10.1f} {r['step_ms']:>9.2f} {tf:>8}"
        f" {frac:>9} {r['compile_s']:>9.1f}"
    )


def _set_up(args):
  """The compilation cache, the config and the mesh (batch sizes checked against it)."""
  import jax
  from saltjax import parallel

  if args.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(args.compilation_cache))
  config = make_config(args)
  mesh = parallel.create_mesh()
  for b in args.batch_sizes + [b for _, b, _ in fold_settings(args)]:
    parallel.check_batch_size(b, mesh, "--batch_sizes")
  devices = jax.devices()
  print(
      f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}),"
      f" jax {jax.__version__}, model dtype {args.dtype}",
      flush=True,
  )
  return config, mesh


def _create_job(config, mesh):
  """The real Job (model, optimiser, initial variables, jitted steps), and its seconds."""
  import numpy as np
  from saltjax.training.job import Job

  # Folds only size its steps_per_epoch, so a made-up assignment serves.
  fold_of = np.arange(config.num_folds * config.batch_size) % config.num_folds
  t = time.perf_counter()
  job = Job.create(config, mesh, fold_of, writer=None)
  return job, time.perf_counter() - t


def _result_header(args, config, job, init_s: float, peak: dict) -> dict:
  """The result's record of the run (device, versions, settings, model); no rows yet."""
  import jax
  from saltjax.model import unet

  devices = jax.devices()
  return {
      "benchmark": "saltjax train step (benchmarks/train_throughput.py)",
      "label": args.label
      or ("CPU smoke test (--tiny): tiny model, not the GPU target" if args.tiny else ""),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "git_commit": report.git_commit(),
      "device": {
          "platform": devices[0].platform,
          "device_kind": devices[0].device_kind,
          "num_devices": len(devices),
          "host": platform.node(),
          "host_cpus": len(os.sched_getaffinity(0)),
      },
      "versions": versions(),
      "settings": {
          "tiny": args.tiny,
          "match_peer": args.match_peer,
          "image_size": config.image_size,
          "dtype": args.dtype,
          "loss": config.loss.name,
          "optimizer": config.optimizer.name,
          "model": {
              k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.to_dict().items()
          },
          "steps_per_repeat": args.steps,
          "repeats": args.repeats,
          "tta": args.tta,
          "compilation_cache": args.compilation_cache,
      },
      "model_params": unet.count_params(job.initial_variables["params"]),
      "init_s": init_s,
      "matmul": peak,
      "train": [],
      "tta": [],
  }


def _measure(job, args, peak: dict, result: dict) -> None:
  """Train steps, then TTA inference, at every setting: rows into `result`, printed."""
  for f, b, strategy in [(1, b, "") for b in args.batch_sizes] + fold_settings(args):
    row = guarded(bench_train, job, b, args, peak["tflops"], f, strategy)
    result["train"].append(row)
    print(
        f"train {f} x batch {b}{f' ({strategy})' if strategy else ''}: "
        + (row.get("error") or f"{row['images_per_s']:.1f} images/s, {row['step_ms']:.2f} ms/step"),
        flush=True,
    )
  if args.tta:
    for b in args.batch_sizes:
      row = guarded(bench_tta, job, b, args, peak["tflops"])
      result["tta"].append(row)
      print(
          f"tta batch {b}: " + (row.get("error") or f"{row['images_per_s']:.1f} images/s"),
          flush=True,
      )


def main(argv=None) -> dict:
  args = parse_args(argv)
  import jax

  config, mesh = _set_up(args)
  peak = matmul_rate(args.matmul_size, args.dtype)
  print(
      f"reference: {args.matmul_size}^3 {args.dtype} matmul at {peak['tflops']:.1f}" " TFLOP/s",
      flush=True,
  )
  job, init_s = _create_job(config, mesh)
  result = _result_header(args, config, job, init_s, peak)
  _measure(job, args, peak, result)

  device_kind = jax.devices()[0].device_kind
  print_table(
      f"train step ({result['model_params'] / 1e6:.1f}M params, {args.dtype},"
      f" {config.image_size}px) on {device_kind}",
      result["train"],
  )
  if result["tta"]:
    print_table(f"TTA inference ({args.tta}) on {device_kind}", result["tta"])

  report.write_result(
      result,
      args.output,
      f"train_throughput_{report.slug(device_kind)}" f"{'_tiny' if args.tiny else ''}",
  )
  return result


if __name__ == "__main__":
  main()

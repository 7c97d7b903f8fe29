"""The PyTorch peer: segmentation_models_pytorch's U-Net, timed like ours.

The peer is what a Kaggle TGS solution would run today:
`smp.Unet('resnet50', encoder_weights=None, in_channels=1, classes=1,
decoder_attention_type='scse')`, trained with the same loss as saltjax's
'bce_dice' (BCE + per-image soft Dice, smooth 1, in float32; written here in
torch to match saltjax.training.losses.bce_dice) and Adam at the seed's 3e-4, with the
usual PyTorch speed settings: bf16 autocast, channels_last, torch.compile
(static shapes, one compilation per batch size), fused Adam, cuDNN autotuning.

Same timing method as benchmarks/train_throughput.py: the batch is on the
device once; per batch size, the first call (compilation + one step) is timed
apart, then the median of --repeats timings of --steps back-to-back steps,
each ended by torch.cuda.synchronize(), gives ms/step and images/s. TTA
inference (identity + hflip, sigmoid, mean, bilinear back to 101x101) is timed
the same way.

The architectures differ in one respect: saltjax's configs/fold.py model also
has scSE in every encoder block, which smp's Unet has not; run
train_throughput.py --match_peer for saltjax on exactly this network.

FLOPs: torch has no XLA-style cost analysis; torch.utils.flop_counter counts
the convolutions and matmuls of one eager step (the bulk, but not the
elementwise work XLA also counts), so compare the two frameworks by images/s.

Needs torch, and segmentation-models-pytorch (`pip install
segmentation-models-pytorch`; it pulls timm, huggingface_hub, safetensors,
torchvision, pillow, tqdm). On a machine without internet carry its wheel:
benchmarks/fetch_wheels.sh puts it in .whl/ and benchmarks/run_gpu.sh
installs from there.

Usage:
  python benchmarks/peer_smp_pytorch.py                    # CUDA GPU
  python benchmarks/peer_smp_pytorch.py --batch_sizes 32 128
  python benchmarks/peer_smp_pytorch.py --tiny             # CPU smoke test
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

RESULTS = REPO / "benchmarks" / "results"
ORIGINAL_SIZE = 101

INSTALL_HELP = """\
segmentation_models_pytorch is not installed. Install it with

  pip install segmentation-models-pytorch

(it needs torch, torchvision, timm, huggingface_hub, safetensors, pillow and
tqdm; a typical CUDA PyTorch image has all of these but smp itself). On a GPU
machine without internet, download the wheel where pip works:

  bash benchmarks/fetch_wheels.sh          # into .whl/

carry .whl/ to the machine, and install it there with

  python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site

(benchmarks/run_gpu.sh does the last two steps itself)."""


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
      "--batch_sizes",
      type=int,
      nargs="+",
      default=None,
      help="batch sizes (default 32 64 128 256 512; --tiny: 2 4)",
  )
  p.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
  p.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
  p.add_argument("--image_size", type=int, default=None, help="default 128; --tiny: 64")
  p.add_argument("--encoder", default=None, help="smp encoder (default resnet50; --tiny: resnet18)")
  p.add_argument(
      "--dtype",
      default=None,
      choices=("bfloat16", "float32"),
      help="autocast dtype (default bfloat16; --tiny: float32)",
  )
  p.add_argument(
      "--compile_mode",
      default=None,
      help="torch.compile mode: default, reduce-overhead, max-autotune, or"
      " none (default 'default'; --tiny: none)",
  )
  p.add_argument(
      "--tta",
      default="hflip",
      choices=("hflip", ""),
      help="TTA of the inference timing ('' skips it)",
  )
  p.add_argument(
      "--matmul_size",
      type=int,
      default=None,
      help="n of the n^3 matmul whose rate is the reference (default 8192)",
  )
  p.add_argument("--tiny", action="store_true", help="CPU smoke test of this script")
  p.add_argument("--label", default="", help="free text stored in the JSON")
  p.add_argument("--output", default="", help="JSON path (default benchmarks/results/...)")
  args = p.parse_args(argv)
  defaults = dict(
      batch_sizes=([2, 4], [32, 64, 128, 256, 512]),
      image_size=(64, 128),
      encoder=("resnet18", "resnet50"),
      dtype=("float32", "bfloat16"),
      compile_mode=("none", "default"),
      matmul_size=(1024, 8192),
  )
  for key, (tiny, full) in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, tiny if args.tiny else full)
  if args.tiny:
    args.steps, args.repeats = min(args.steps, 3), min(args.repeats, 3)
  return args


def bce_dice(logits, masks, smooth: float = 1.0):
  """saltjax.training.losses.bce_dice in torch: mean BCE + mean per-image soft Dice."""
  import torch
  import torch.nn.functional as F

  logits, masks = logits.float(), masks.float()
  # Every image has the same pixel count: the mean over all pixels equals the
  # mean of per-image means, as in saltjax.training.losses.bce.
  bce = F.binary_cross_entropy_with_logits(logits, masks)
  probs, labels = torch.sigmoid(logits).flatten(1), masks.flatten(1)
  intersection = (probs * labels).sum(1)
  denominator = probs.sum(1) + labels.sum(1)
  dice = 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)
  return bce + dice.mean()


class Timer:
  """Wall time of a block of device work: perf_counter around synchronize."""

  def __init__(self, device):
    import torch

    self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

  def __call__(self, fn, *args) -> float:
    self._sync()
    t = time.perf_counter()
    fn(*args)
    self._sync()
    return time.perf_counter() - t


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
  times = [fn() for _ in range(repeats)]
  return statistics.median(times), times


def matmul_rate(torch, device, n: int, dtype, timer: Timer, repeats=5, iters=10) -> dict:
  a = torch.randn(n, n, device=device, dtype=dtype)
  b = torch.randn(n, n, device=device, dtype=dtype)
  timer(lambda: a @ b)

  def once():
    return timer(lambda: [a @ b for _ in range(iters)]) / iters

  seconds, _ = median_time(once, repeats)
  return {
      "n": n,
      "dtype": str(dtype).replace("torch.", ""),
      "seconds": seconds,
      "tflops": 2.0 * n**3 / seconds / 1e12,
  }


def reset_compiler(torch) -> None:
  """Each batch size compiles afresh, with static shapes (as XLA does)."""
  torch._dynamo.reset()


def new_model(smp, torch, args, device):
  model = smp.Unet(
      args.encoder, encoder_weights=None, in_channels=1, classes=1, decoder_attention_type="scse"
  )
  return model.to(device=device, memory_format=torch.channels_last)


def make_compiled(torch, fn, args):
  if args.compile_mode == "none":
    return fn
  # dynamic=False: a static specialisation per batch size. Without it, the
  # second batch size would switch dynamo to dynamic-shape kernels.
  return torch.compile(
      fn, mode=None if args.compile_mode == "default" else args.compile_mode, dynamic=False
  )


def count_flops(torch, fn) -> float | None:
  try:
    from torch.utils.flop_counter import FlopCounterMode
  except ImportError:
    return None
  counter = FlopCounterMode(display=False)
  with counter:
    fn()
  return float(counter.get_total_flops())


def bench_train(
    smp,
    torch,
    args,
    device,
    batch_size: int,
    timer: Timer,
    peak_tflops: float,
    flops_per_image: dict,
) -> dict:
  reset_compiler(torch)
  amp = args.dtype == "bfloat16"
  model = new_model(smp, torch, args, device).train()
  fused = device.type == "cuda"
  opt = torch.optim.Adam(model.parameters(), lr=3e-4, fused=fused)
  gen = torch.Generator(device="cpu").manual_seed(0)
  size = args.image_size
  x = (
      torch.rand(batch_size, 1, size, size, generator=gen)
      .to(device)
      .contiguous(memory_format=torch.channels_last)
  )
  y = (torch.rand(batch_size, size, size, generator=gen) > 0.7).float().to(device)

  def forward_loss(x, y):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
      logits = model(x)[:, 0]
    return bce_dice(logits, y)

  compiled_loss = make_compiled(torch, forward_loss, args)

  def train_step():
    loss = compiled_loss(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  if "train" not in flops_per_image:
    # Eager fwd + bwd, counted once and scaled: the count is linear in batch.
    flops = count_flops(torch, lambda: forward_loss(x, y).backward())
    opt.zero_grad(set_to_none=True)
    flops_per_image["train"] = flops / batch_size if flops else None
  first_s = timer(train_step)  # compilation + one step
  timer(train_step)  # warm-up: cuDNN autotuning, allocator

  def once():
    return timer(lambda: [train_step() for _ in range(args.steps)]) / args.steps

  step_s, all_s = median_time(once, args.repeats)
  loss = float(train_step().detach())
  row = {
      "batch_size": batch_size,
      "compile_s": first_s,
      "step_ms": 1e3 * step_s,
      "step_ms_repeats": [1e3 * s for s in all_s],
      "images_per_s": batch_size / step_s,
      "loss_finite": bool(loss == loss and abs(loss) != float("inf")),
  }
  if flops_per_image.get("train"):
    row["flops"] = flops_per_image["train"] * batch_size
    row["tflops"] = row["flops"] / step_s / 1e12
    row["fraction_of_matmul_rate"] = row["tflops"] / peak_tflops
  return row


def bench_tta(
    smp,
    torch,
    args,
    device,
    batch_size: int,
    timer: Timer,
    peak_tflops: float,
    flops_per_image: dict,
) -> dict:
  import torch.nn.functional as F

  reset_compiler(torch)
  amp = args.dtype == "bfloat16"
  model = new_model(smp, torch, args, device).eval()
  gen = torch.Generator(device="cpu").manual_seed(1)
  size = args.image_size
  x = (
      torch.rand(batch_size, 1, size, size, generator=gen)
      .to(device)
      .contiguous(memory_format=torch.channels_last)
  )

  def tta(x):
    # Identity + hflip, averaged on probabilities, then back to 101x101: what
    # saltjax.model.tta.make_infer_fn(tta='hflip') computes.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
      plain = torch.sigmoid(model(x).float())
      flipped = torch.sigmoid(model(torch.flip(x, dims=[3])).float())
    probs = 0.5 * (plain + torch.flip(flipped, dims=[3]))
    return F.interpolate(
        probs, size=(ORIGINAL_SIZE, ORIGINAL_SIZE), mode="bilinear", align_corners=False
    )[:, 0]

  compiled = make_compiled(torch, tta, args)
  with torch.inference_mode():
    if "tta" not in flops_per_image:
      flops = count_flops(torch, lambda: tta(x))
      flops_per_image["tta"] = flops / batch_size if flops else None
    first_s = timer(compiled, x)
    timer(compiled, x)

    def once():
      return timer(lambda: [compiled(x) for _ in range(args.steps)]) / args.steps

    step_s, all_s = median_time(once, args.repeats)
  row = {
      "batch_size": batch_size,
      "compile_s": first_s,
      "step_ms": 1e3 * step_s,
      "step_ms_repeats": [1e3 * s for s in all_s],
      "images_per_s": batch_size / step_s,
  }
  if flops_per_image.get("tta"):
    row["flops"] = flops_per_image["tta"] * batch_size
    row["tflops"] = row["flops"] / step_s / 1e12
    row["fraction_of_matmul_rate"] = row["tflops"] / peak_tflops
  return row


def guarded(torch, fn, *a) -> dict:
  """One measurement; an out-of-memory batch size is recorded, not fatal."""
  batch_size = a[4]
  try:
    return fn(*a)
  except torch.cuda.OutOfMemoryError as e:
    error = "out of memory: " + str(e).splitlines()[0][:300]
  except RuntimeError as e:
    if "out of memory" not in str(e).lower():
      raise
    error = "out of memory: " + str(e).splitlines()[0][:300]
  if torch.cuda.is_available():
    torch.cuda.empty_cache()
  return {"batch_size": batch_size, "error": error}


def versions(torch) -> dict:
  from importlib import metadata

  out = {
      "python": platform.python_version(),
      "torch": torch.__version__,
      "cuda": torch.version.cuda,
  }
  if torch.backends.cudnn.is_available():
    out["cudnn"] = torch.backends.cudnn.version()
  for name in ("segmentation-models-pytorch", "timm", "torchvision", "triton"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def print_table(title: str, rows: list[dict]) -> None:
  print(f"\n{title}")
  print(f"{'batch':>6} {'images/s':>10} {'ms/step':>9} {'TFLOP/s*':>8} {'first s':>8}")
  for r in rows:
    if "error" in r:
      print(f"{r['batch_size']:>6}  {r['error'][:70]}")
      continue
    tf = f"{r['tflops']:.3g}" if r.get("tflops") else "-"
    print(
        f"{r['batch_size']:>6} {r['images_per_s']:>10.1f} {r['step_ms']:>9.2f} {tf:>8}"
        f" {r['compile_s']:>8.1f}"
    )
  print("* convs and matmuls only (torch.utils.flop_counter)")


def _device(torch, args):
  """The device to time on and its name: a CUDA GPU, or with --tiny the CPU."""
  if torch.cuda.is_available():
    device = torch.device("cuda")
    device_kind = torch.cuda.get_device_name(device)
  elif args.tiny:
    device, device_kind = torch.device("cpu"), platform.processor() or "cpu"
  else:
    raise SystemExit("no CUDA GPU visible to torch; use --tiny for a CPU smoke test")
  return device, device_kind


def _result_header(torch, args, device, device_kind: str, params: int, peak: dict) -> dict:
  """The result's record of the run (device, versions, settings); no rows yet."""
  return {
      "benchmark": "segmentation_models_pytorch peer (benchmarks/peer_smp_pytorch.py)",
      "label": args.label
      or ("CPU smoke test (--tiny): tiny model, not the GPU target" if args.tiny else ""),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": {
          "platform": device.type,
          "device_kind": device_kind,
          "num_devices": 1,
          "host": platform.node(),
          "host_cpus": len(os.sched_getaffinity(0)),
      },
      "versions": versions(torch),
      "settings": {
          "tiny": args.tiny,
          "encoder": args.encoder,
          "image_size": args.image_size,
          "dtype": args.dtype,
          "compile_mode": args.compile_mode,
          "channels_last": True,
          "loss": "bce_dice",
          "optimizer": "adam (fused)" if device.type == "cuda" else "adam",
          "steps_per_repeat": args.steps,
          "repeats": args.repeats,
          "tta": args.tta,
      },
      "model_params": params,
      "matmul": peak,
      "train": [],
      "tta": [],
  }


def _measure(smp, torch, args, device, timer: Timer, peak: dict, result: dict) -> None:
  """Training, then TTA inference, at every batch size: rows into `result`, printed."""
  flops_per_image: dict = {}
  for b in args.batch_sizes:
    row = guarded(
        torch, bench_train, smp, torch, args, device, b, timer, peak["tflops"], flops_per_image
    )
    result["train"].append(row)
    print(
        f"train batch {b}: "
        + (row.get("error") or f"{row['images_per_s']:.1f} images/s, {row['step_ms']:.2f} ms/step"),
        flush=True,
    )
  if args.tta:
    for b in args.batch_sizes:
      row = guarded(
          torch, bench_tta, smp, torch, args, device, b, timer, peak["tflops"], flops_per_image
      )
      result["tta"].append(row)
      print(
          f"tta batch {b}: " + (row.get("error") or f"{row['images_per_s']:.1f} images/s"),
          flush=True,
      )


def main(argv=None) -> dict:
  args = parse_args(argv)
  try:
    import segmentation_models_pytorch as smp
  except ImportError:
    print(INSTALL_HELP, file=sys.stderr)
    raise SystemExit(2)
  import torch

  device, device_kind = _device(torch, args)
  # The peer's best settings: cuDNN picks the fastest conv algorithms, and
  # any float32 matmul may use TF32.
  torch.backends.cudnn.benchmark = True
  torch.set_float32_matmul_precision("high")
  timer = Timer(device)
  print(
      f"{device_kind}, torch {torch.__version__}, smp {smp.__version__},"
      f" autocast {args.dtype}, compile {args.compile_mode}",
      flush=True,
  )

  peak = matmul_rate(torch, device, args.matmul_size, getattr(torch, args.dtype), timer)
  print(
      f"reference: {args.matmul_size}^3 {args.dtype} matmul at {peak['tflops']:.1f}" " TFLOP/s",
      flush=True,
  )
  params = sum(p.numel() for p in new_model(smp, torch, args, torch.device("cpu")).parameters())
  result = _result_header(torch, args, device, device_kind, params, peak)
  _measure(smp, torch, args, device, timer, peak, result)

  print_table(
      f"smp Unet({args.encoder}, scse) training ({params / 1e6:.1f}M params,"
      f" {args.dtype}, {args.image_size}px) on {device_kind}",
      result["train"],
  )
  if result["tta"]:
    print_table(f"TTA inference ({args.tta}) on {device_kind}", result["tta"])
  report.write_result(
      result, args.output, f"peer_smp_{report.slug(device_kind)}{'_tiny' if args.tiny else ''}"
  )
  return result


if __name__ == "__main__":
  main()

"""The compile-only run's report: memory per chip, the roofline bound, the table.

A program's bound is the roofline's lower bound on its time on one chip,
max(FLOPs / peak FLOP/s, HBM bytes / HBM bandwidth), from XLA's count of the
compiled program's FLOPs and the HBM traffic of its instructions
(`hlo_traffic`: of all the bytes they move, those in HBM; what stays in
on-chip memory has a far higher bandwidth); the epoch's and the job's are the sums of
their programs' bounds times their calls. They are bounds, never
measurements: a real step is slower (latencies, collectives, the host), and
no faster.
"""

from __future__ import annotations

import dataclasses
import pathlib

from saltjax import workdir as workdir_lib
from saltjax.errors import ConfigError

REPORT_JSON = "compile_report.json"
REPORT_MD = "compile_report.md"


def bound_seconds(flops: float, nbytes: float, peak_flops: float, bandwidth: float) -> float:
  """The roofline's lower bound: the slower of arithmetic at peak and traffic at full bandwidth."""
  return max(flops / peak_flops, nbytes / bandwidth)


def build(spec, programs, facts: dict, versions: dict) -> dict:
  """The report (keys documented in docs/compile_only.md): the slice, each program, the bounds."""
  rows = []
  for p in programs:
    row = dataclasses.asdict(p)
    row["bound_seconds"] = bound_seconds(
        p.flops_per_chip,
        p.hbm_bytes_per_chip,
        spec.peak_flops_per_chip,
        spec.hbm_bandwidth_per_chip,
    )
    images = p.images_per_chip or float("nan")
    row["flops_per_image"] = p.flops_per_chip / images
    row["bytes_per_image"] = p.bytes_per_chip / images
    row["hbm_bytes_per_image"] = p.hbm_bytes_per_chip / images
    row["memory_fraction_of_hbm"] = p.memory_per_chip["total"] / spec.hbm_bytes_per_chip
    rows.append(row)
  return {
      "accelerator": spec.accelerator,
      "topology": spec.topology,
      "chips": spec.chips,
      "hosts": spec.hosts,
      "hbm_bytes_per_chip": spec.hbm_bytes_per_chip,
      "peak_flops_per_chip": spec.peak_flops_per_chip,
      "hbm_bandwidth_per_chip": spec.hbm_bandwidth_per_chip,
      "bound_seconds_epoch": sum(r["bound_seconds"] * r["calls_per_epoch"] for r in rows),
      "bound_seconds_job": sum(r["bound_seconds"] * r["calls_per_job"] for r in rows),
      "programs": rows,
      "job": facts,
      "versions": versions,
  }


def check_fits(report: dict) -> None:
  """A `ConfigError` naming every program over one chip's HBM, as the slice would fail."""
  limit = report["hbm_bytes_per_chip"]
  over = [p for p in report["programs"] if p["memory_per_chip"]["total"] > limit]
  if over:
    raise ConfigError(
        "; ".join(
            f"{p['name']} needs {_gib(p['memory_per_chip']['total'])} per chip, over the"
            f" {_gib(limit)} of HBM of a {report['accelerator']} chip"
            for p in over
        )
        + ": lower config.batch_size (or config.parallel_folds), or use a larger slice"
    )


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def markdown(report: dict) -> str:
  """The report as a markdown table, a row per program."""
  lines = [
      f"# {report['accelerator']}: {report['chips']} chips ({report['topology']}),"
      f" {report['hosts']} host(s)",
      "",
      f"Per chip: {_gib(report['hbm_bytes_per_chip'])} HBM,"
      f" {report['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s (bf16),"
      f" {report['hbm_bandwidth_per_chip'] / 1e9:.0f} GB/s.",
      "",
      "| program | compile s | argument | output | temp | code | total (of HBM) | GFLOP/chip"
      " | GB/chip | HBM GB/chip | images/chip | GFLOP/image | GB/image | HBM GB/image | bound ms"
      " | XLA's estimate, Mcycles | calls/job |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---:"
      " | ---: | ---: | ---: | ---: |",
  ]
  for p in report["programs"]:
    m = p["memory_per_chip"]
    lines.append(
        f"| {p['name']} | {p['compile_seconds']:.1f} | {_gib(m['argument'])} | {_gib(m['output'])}"
        f" | {_gib(m['temp'])} | {_gib(m['code'])} | {_gib(m['total'])}"
        f" ({100 * p['memory_fraction_of_hbm']:.0f}%) | {p['flops_per_chip'] / 1e9:.1f}"
        f" | {p['bytes_per_chip'] / 1e9:.2f} | {p['hbm_bytes_per_chip'] / 1e9:.2f}"
        f" | {p['images_per_chip']:g} | {p['flops_per_image'] / 1e9:.2f}"
        f" | {p['bytes_per_image'] / 1e9:.3f} | {p['hbm_bytes_per_image'] / 1e9:.3f}"
        f" | {1e3 * p['bound_seconds']:.2f} | {p['estimated_cycles_per_chip'] / 1e6:.2f}"
        f" | {p['calls_per_job']} |"
    )
  lines += [
      "",
      f"Roofline lower bound (not a measurement): {report['bound_seconds_epoch']:.4g} s for the"
      f" first epoch, {report['bound_seconds_job']:.4g} s for the whole job (every fold's epochs"
      " and the prediction). XLA's estimate: the TPU compiler's own estimate of a call's"
      " cycles, its instructions' estimates summed.",
  ]
  return "\n".join(lines) + "\n"


def write(report: dict, workdir: pathlib.Path) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_json(report, workdir / REPORT_JSON)
  workdir_lib.write_text(markdown(report), workdir / REPORT_MD)

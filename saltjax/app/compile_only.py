"""`--config.compile_for=v5e-8`: compile the job for a TPU slice on this machine; train nothing.

XLA's TPU compiler (libtpu, `pip install -r requirements-tpu.txt`) runs on
any CPU: given a slice's compile-only devices (`tpu_slices`), every program
the job runs is compiled at the config's real shapes on the mesh the pod
would build (`compile_programs`), and the report (`compile_report`) says
what each needs per chip and the roofline bound on the job's time. A program
over the chip's HBM is refused, naming it, as the pod would fail: in minutes
here, not hours later there.
"""

from __future__ import annotations

import logging
import pathlib

from saltjax.app import compile_programs
from saltjax.app import compile_report
from saltjax.app import tpu_slices


def run(config, workdir: pathlib.Path) -> dict:
  """Compiles the job for `config.compile_for`; writes and returns the report."""
  from saltjax.app import process
  from saltjax.data import dataset as data_lib

  spec = tpu_slices.slice_spec(config.compile_for)
  devices = tpu_slices.compile_only_devices(spec)
  logging.info(
      "Compiling for %s: %d chips (%s), %d host(s); nothing is trained.",
      spec.accelerator,
      spec.chips,
      spec.topology,
      spec.hosts,
  )
  data = data_lib.load(config)
  programs, facts = compile_programs.job_programs(config, devices, data)
  report = compile_report.build(spec, programs, facts, process.package_versions())
  compile_report.write(report, workdir)
  print(compile_report.markdown(report))
  print(f"wrote {workdir / compile_report.REPORT_JSON} and {workdir / compile_report.REPORT_MD}")
  compile_report.check_fits(report)
  return report

"""What every benchmark script does with its result: name it, write it, say where."""

from __future__ import annotations

import json
import pathlib
import subprocess

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]


def versions(names) -> dict:
  """Python's version and those of the named packages that are installed."""
  import sys

  sys.path.insert(0, str(REPO))
  from saltjax.app import process  # light: no TensorFlow, no model

  return process.package_versions(names)


def git_commit() -> str:
  """The checkout's commit, short, or '' outside a git checkout."""
  try:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ""


def cpu_header(benchmark: str, packages) -> dict:
  """The fields a timing on this machine's JAX device starts its result with."""
  import datetime
  import os

  import jax

  return {
      "benchmark": benchmark,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": f"{jax.devices()[0].platform} ({os.cpu_count()} cores)",
      "load_average_at_end": os.getloadavg(),
      "versions": versions(packages),
      "git_commit": git_commit(),
  }


def slug(text: str) -> str:
  return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def write_result(result: dict, output: str | None, stem: str) -> pathlib.Path:
  """Writes `result` to `output`, or to results/<stem>_<date>.json."""
  out = pathlib.Path(output) if output else RESULTS / f"{stem}_{result['date'][:10]}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n")
  print(f"\nwrote {out}")
  return out

"""What every benchmark script does with its result: name it, write it, say where."""

from __future__ import annotations

import json
import pathlib

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def slug(text: str) -> str:
  return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def write_result(result: dict, output: str | None, stem: str) -> pathlib.Path:
  """Writes `result` to `output`, or to results/<stem>_<date>.json."""
  out = pathlib.Path(output) if output else RESULTS / f"{stem}_{result['date'][:10]}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n")
  print(f"\nwrote {out}")
  return out

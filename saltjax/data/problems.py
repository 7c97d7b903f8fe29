"""The problems found in a data directory, collected to be reported at once.

`saltjax.data.layout` checks a whole Kaggle-layout directory (and
`saltjax.data.png_sources` the zips and folders it reads PNGs from) before
returning anything, adding each problem here, so that a user fixing a download
sees the whole list at once instead of one error per run.
"""

from __future__ import annotations

# How many lines of one kind of problem a DataError message shows before it
# summarises the rest; a broken download can have thousands of the same kind.
_MAX_LINES_PER_KIND = 10


class Problems:
  """Problems found so far, each tagged with a kind used for summarising."""

  def __init__(self):
    self.items: list[tuple[str, str]] = []  # (kind, line)

  def add(self, kind: str, line: str) -> None:
    self.items.append((kind, line))

  def __bool__(self) -> bool:
    return bool(self.items)

  def lines(self) -> list[str]:
    return [line for _, line in self.items]

  def message(self, data_dir: str) -> str:
    """One message, grouped by kind, with long groups cut to a few lines."""
    by_kind: dict[str, list[str]] = {}  # Kinds in order of first appearance.
    for kind, line in self.items:
      by_kind.setdefault(kind, []).append(line)
    out = [f"data_dir {data_dir} has {len(self.items)} problem(s):"]
    for kind, lines in by_kind.items():
      out.extend(f"  {line}" for line in lines[:_MAX_LINES_PER_KIND])
      if len(lines) > _MAX_LINES_PER_KIND:
        out.append(f"  ... and {len(lines) - _MAX_LINES_PER_KIND} more {kind}")
    return "\n".join(out)

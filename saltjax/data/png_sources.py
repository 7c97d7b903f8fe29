"""The PNGs of one part (train or test): an unpacked folder or the zip Kaggle serves.

Kaggle's train.zip holds images/ and masks/ and its test.zip holds images/;
archives that put those folders one level down (train/images/...) work too.
Problems inside an archive name the member, as in
``train.zip:images/<id>.png``.  `load_many` reads PNGs from these sources and
checks them (`saltjax.data.png_files`), on threads.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Sequence
import zipfile
import zlib

import numpy as np

from saltjax.data import png_files
from saltjax.data import problems as problems_lib


class PngSource:
  """The PNGs of one part, by sub-folder ('images', 'masks') and id."""

  def stems(self, sub: str) -> set[str]:
    """The ids that have a PNG in `sub`."""
    raise NotImplementedError

  def name(self, sub: str, stem: str) -> str:
    """How problems name the PNG of `stem` in `sub` (present or not)."""
    raise NotImplementedError

  def where(self, sub: str) -> str:
    """How problems name the folder `sub` itself."""
    raise NotImplementedError

  def read(self, sub: str, stem: str) -> bytes:
    """The PNG's bytes; raises OSError when they cannot be read."""
    raise NotImplementedError

  def close(self) -> None:
    pass


def _png_stems(directory: str) -> set[str]:
  with os.scandir(directory) as entries:
    return {e.name[:-4] for e in entries if e.name.endswith(".png") and e.is_file()}


class _FolderSource(PngSource):
  """<data_dir>/<part>/<sub>/<id>.png, named relative to data_dir."""

  def __init__(self, data_dir: str, part: str):
    self._data_dir = data_dir
    self._part = part

  def stems(self, sub):
    return _png_stems(os.path.join(self._data_dir, self._part, sub))

  def name(self, sub, stem):
    return f"{self._part}/{sub}/{stem}.png"

  def where(self, sub):
    return f"{self._part}/{sub}"

  def read(self, sub, stem):
    path = os.path.join(self._data_dir, self._part, sub, f"{stem}.png")
    with open(path, "rb") as f:
      return f.read()


# Archivers add these beside the real members; they are never data.
def _is_junk_member(name: str) -> bool:
  return name.startswith("__MACOSX/") or os.path.basename(name).startswith("._")


class _ZipSource(PngSource):
  """<part>.zip members <prefix><sub>/<id>.png, named '<part>.zip:<member>'."""

  def __init__(
      self, archive: zipfile.ZipFile, label: str, prefix: str, members: dict[str, dict[str, str]]
  ):
    self._archive = archive
    self._label = label  # e.g. "train.zip"
    self._prefix = prefix  # "" or e.g. "train/"
    self._members = members  # sub -> stem -> member name
    # One archive handle shared by the decoding threads: reads (seek, read,
    # inflate) go one at a time, while the PNG decoding still overlaps.
    self._lock = threading.Lock()

  def stems(self, sub):
    return set(self._members.get(sub, {}))

  def name(self, sub, stem):
    member = self._members.get(sub, {}).get(stem, f"{self._prefix}{sub}/{stem}.png")
    return f"{self._label}:{member}"

  def where(self, sub):
    return f"{self._label}:{self._prefix}{sub}/"

  def read(self, sub, stem):
    member = self._members[sub][stem]
    try:
      with self._lock:
        return self._archive.read(member)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
      # A corrupt member (bad CRC, cut-off data), an unsupported compression
      # method or encryption: say why, naming the member like any bad PNG.
      raise OSError(f"{type(e).__name__}: {e}") from e

  def close(self):
    self._archive.close()


def _open_zip(
    data_dir: str, part: str, subdirs: Sequence[str], problems: problems_lib.Problems
) -> _ZipSource | None:
  """Opens <part>.zip and finds its sub-folders; None (with a problem) if bad."""
  label = f"{part}.zip"
  path = os.path.join(data_dir, label)
  holds = " and ".join(f"{s}/" for s in subdirs)
  unpack_hint = (
      f"re-download it, or unzip a good copy (holding {holds}) into"
      f" {os.path.join(data_dir, part)}"
  )
  try:
    archive = zipfile.ZipFile(path)
  except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as e:
    detail = getattr(e, "strerror", None) or e
    problems.add("bad zip files", f"{label} is not a readable zip file ({detail}); {unpack_hint}")
    return None
  # prefix -> sub -> stem -> member.  Kaggle's archives put the folders at the
  # top, but re-zipped copies often nest them under '<part>/'; look anywhere.
  found: dict[str, dict[str, dict[str, str]]] = {}
  for info in archive.infolist():
    name = info.filename
    if info.is_dir() or not name.endswith(".png") or _is_junk_member(name):
      continue
    parts = name.split("/")
    if len(parts) < 2 or parts[-2] not in subdirs:
      continue
    prefix = "".join(f"{p}/" for p in parts[:-2])
    found.setdefault(prefix, {}).setdefault(parts[-2], {})[parts[-1][:-4]] = name
  complete = sorted(p for p, subs in found.items() if all(s in subs for s in subdirs))
  if len(complete) == 1:
    prefix = complete[0]
    return _ZipSource(archive, label, prefix, found[prefix])
  archive.close()
  if complete:
    shown = ", ".join(repr(p or "(top)") for p in complete)
    problems.add(
        "bad zip files",
        f"{label} holds {holds} in more than one folder ({shown});"
        f" keep one copy, or unzip the one you mean into"
        f" {os.path.join(data_dir, part)}",
    )
  else:
    seen = sorted({f"{p}{s}/" for p, subs in found.items() for s in subs})
    what = f"only {', '.join(seen)}" if seen else "no such folders of PNGs"
    problems.add(
        "bad zip files",
        f"{label} should hold {holds} with <id>.png files but has" f" {what}; {unpack_hint}",
    )
  return None


def open_part(
    data_dir: str, part: str, subdirs: Sequence[str], problems: problems_lib.Problems
) -> PngSource | None:
  """The PNGs of <part>/<subdirs>: the unpacked folders, else <part>.zip.

  Unpacked folders win when both exist.  Returns None (with a problem) when
  a folder is missing and there is no zip, or the zip is unusable.
  """
  have = {s: os.path.isdir(os.path.join(data_dir, part, s)) for s in subdirs}
  if all(have.values()):
    return _FolderSource(data_dir, part)
  if os.path.isfile(os.path.join(data_dir, f"{part}.zip")):
    return _open_zip(data_dir, part, subdirs, problems)
  for sub in subdirs:
    if not have[sub]:
      problems.add(
          "missing files",
          f"directory {part}/{sub} is missing from {data_dir}"
          f" (and there is no {part}.zip to read instead)",
      )
  return None


def _load_entry(
    source: PngSource, sub: str, stem: str, kind: str
) -> tuple[np.ndarray | None, list[str]]:
  try:
    data = source.read(sub, stem)
  except OSError as e:
    return None, [f"cannot be read ({e.strerror or e})"]
  array, error = png_files.decode_bytes(data)
  if error:
    return None, [error]
  return (png_files.check_image if kind == "image" else png_files.check_mask)(array)


def load_many(
    entries: Sequence[tuple[PngSource, str, str, str]],
) -> list[tuple[np.ndarray | None, list[str]]]:
  """Reads and checks (source, sub, stem, kind) entries, in order."""
  # cv2.imdecode and file reads release the GIL, so threads overlap both the
  # disk and the decoding without the pickling cost of processes.
  if not entries:
    return []
  with concurrent.futures.ThreadPoolExecutor() as pool:
    return list(pool.map(lambda entry: _load_entry(*entry), entries))

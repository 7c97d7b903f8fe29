"""Validates and reads a Kaggle TGS Salt data directory.

The layout a data_dir holds::

  train.csv                 id,rle_mask (column-major 1-indexed RLE or empty)
  depths.csv                id,z
  train/images/<id>.png     101x101, 8-bit gray (or 3 equal channels)
  train/masks/<id>.png      101x101, 8- or 16-bit, nonzero is salt
  test/images/<id>.png      101x101, 8-bit gray (or 3 equal channels)
  sample_submission.csv     optional; when present its ids are the test ids

Kaggle serves the PNGs zipped, and the zips can be read as they are: where
train/ (or test/) is not unpacked, train.zip (test.zip) in data_dir is read
instead, PNGs straight out of the archive.  Kaggle's train.zip holds images/
and masks/ and its test.zip holds images/; archives that put those folders one
level down (train/images/...) work too.  Unpacked folders win when both exist,
and problems inside an archive name the member, as in
``train.zip:images/<id>.png``.

Every problem is collected before anything is returned, so that a user fixing
a download sees the whole list at once instead of one error per run.  Each PNG
is decoded exactly once: the arrays checked by validation are the arrays
returned by `read_layout`.

This module reads the CSV files, scans the directory and holds the public API;
`saltjax.data.png_sources` opens the folders and zips and reads their PNGs,
`saltjax.data.png_files` decodes and checks each PNG, and
`saltjax.data.problems` collects what is wrong.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from saltjax import errors
from saltjax import geometry
from saltjax.data import png_files
from saltjax.data import png_sources
from saltjax.data import problems as problems_lib
from saltjax.data import rle

IMAGE_SIZE = geometry.ORIGINAL_SIZE

_TRAIN_CSV_COLUMNS = ["id", "rle_mask"]
_DEPTHS_CSV_COLUMNS = ["id", "z"]


class DataError(errors.DataError):
  """All problems found in a data directory, one per line."""

  def __init__(self, message: str, problems: Sequence[str] = ()):
    super().__init__(message)
    # The full, unsummarised list, for callers that want to process it.
    self.problems = list(problems)


@dataclasses.dataclass
class SaltData:
  """The contents of a data directory, in train.csv / test-id order."""

  train_ids: list[str]
  train_images: np.ndarray  # (N, 101, 101) uint8
  train_masks: np.ndarray  # (N, 101, 101) uint8 in {0, 1}
  train_depths: np.ndarray  # (N,) int64 (from depths.csv)
  test_ids: list[str]
  test_images: np.ndarray  # (M, 101, 101) uint8
  test_depths: np.ndarray  # (M,) int64


def read_image(path) -> np.ndarray:
  """Reads one image as uint8 (101, 101); raises DataError naming the file."""
  path = os.fspath(path)
  image, issues = png_files.load_checked(path, "image")
  if issues:
    lines = [f"{path} {issue}" for issue in issues]
    raise DataError("\n".join(lines), lines)
  return image


def read_mask(path) -> np.ndarray:
  """Reads one mask as uint8 {0, 1} (101, 101); raises DataError on problems."""
  path = os.fspath(path)
  mask, issues = png_files.load_checked(path, "mask")
  if issues:
    lines = [f"{path} {issue}" for issue in issues]
    raise DataError("\n".join(lines), lines)
  return mask


# ---------------------------------------------------------------------------
# CSV files.


def _read_csv(
    data_dir: str, name: str, columns: list[str] | None, problems: problems_lib.Problems
) -> pd.DataFrame | None:
  """Reads a CSV as strings; None (with a problem) when unusable."""
  path = os.path.join(data_dir, name)
  try:
    # Strings throughout: ids like "00e1" must not become numbers and an empty
    # rle_mask must stay "" rather than NaN.
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
  except pd.errors.EmptyDataError:
    problems.add("bad csv files", f"{name} is empty (expected a header line)")
    return None
  except Exception as e:  # pylint: disable=broad-except
    text = str(e).strip()
    detail = text.splitlines()[0] if text else type(e).__name__
    problems.add("bad csv files", f"{name} cannot be parsed: {detail}")
    return None
  frame.columns = [str(c).strip() for c in frame.columns]
  if columns is not None and list(frame.columns) != columns:
    problems.add(
        "bad csv files",
        f"{name} has columns {list(frame.columns)}; expected"
        f" {columns} (header line {','.join(columns)!r})",
    )
    return None
  if columns is None and "id" not in frame.columns:
    problems.add(
        "bad csv files", f"{name} has columns {list(frame.columns)}; expected an 'id'" " column"
    )
    return None
  frame["id"] = frame["id"].str.strip()
  return frame


def _check_ids(name: str, ids: Sequence[str], problems: problems_lib.Problems) -> None:
  """Reports empty and duplicated ids, naming their CSV line numbers."""
  lines_by_id: dict[str, list[int]] = collections.defaultdict(list)
  for row, id_ in enumerate(ids):
    lines_by_id[id_].append(row + 2)  # Line 1 is the header.
  for id_, lines in lines_by_id.items():
    if not id_:
      problems.add("empty ids", f"{name} has an empty id on line(s) {_short(lines)}")
    elif len(lines) > 1:
      problems.add(
          "duplicated ids", f"{name} has id {id_!r} {len(lines)} times (lines" f" {_short(lines)})"
      )


def _short(items: Iterable, limit: int = 5) -> str:
  items = list(items)
  text = ", ".join(map(str, items[:limit]))
  return text + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _parse_depths(frame: pd.DataFrame, problems: problems_lib.Problems) -> dict[str, int | None]:
  """Depth per id; None where z is not an integer (reported once, here)."""
  depths = {}
  for id_, z in zip(frame["id"], frame["z"]):
    try:
      value = int(z)
    except ValueError:
      try:  # Tolerate "123.0", which some tools write for integers.
        as_float = float(z)
        value = int(as_float) if as_float.is_integer() else None
      except ValueError:
        value = None
    if value is None:
      problems.add("bad depths", f"depths.csv has non-integer z {z!r} for id" f" {id_!r}")
    # Keep the id even when z is bad, so it is not also reported as missing.
    depths.setdefault(id_, value)
  return depths


# ---------------------------------------------------------------------------
# The whole directory.


def _scan(data_dir, with_test: bool) -> tuple[problems_lib.Problems, SaltData | None]:
  """Checks everything, decoding each PNG once; data is None on problems."""
  problems = problems_lib.Problems()
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    what = "is not a directory" if os.path.exists(data_dir) else "does not exist"
    problems.add("missing files", f"data_dir {data_dir} {what}")
    return problems, None
  present = {}
  for name in ("train.csv", "depths.csv"):
    present[name] = os.path.isfile(os.path.join(data_dir, name))
    if not present[name]:
      problems.add("missing files", f"{name} is missing from {data_dir}")
  sources = {"train": png_sources.open_part(data_dir, "train", ("images", "masks"), problems)}
  if with_test:
    sources["test"] = png_sources.open_part(data_dir, "test", ("images",), problems)
  try:
    data = _scan_sources(data_dir, present, sources, problems)
  finally:
    for source in sources.values():
      if source is not None:
        source.close()
  return problems, data


def _scan_sources(
    data_dir: str,
    present: dict[str, bool],
    sources: dict[str, png_sources.PngSource | None],
    problems: problems_lib.Problems,
) -> SaltData | None:
  """The body of `_scan`, once the PNG sources are open."""
  train_ids: list[str] | None = None
  # Decoded RLE per train id (None where it is invalid), checked even for ids
  # whose PNGs are missing so that one run reports both kinds of problem.
  rle_masks: dict[str, np.ndarray | None] = {}
  if present["train.csv"]:
    train_ids, rle_masks = _read_train_csv(data_dir, problems)

  depths: dict[str, int | None] | None = None
  if present["depths.csv"]:
    frame = _read_csv(data_dir, "depths.csv", _DEPTHS_CSV_COLUMNS, problems)
    if frame is not None:
      _check_ids("depths.csv", list(frame["id"]), problems)
      depths = _parse_depths(frame, problems)

  train_rows: list[int] = []
  train_source = sources["train"]
  if train_ids is not None and train_source is not None:
    train_rows = _train_rows(train_ids, train_source, problems)

  test_ids: list[str] = []
  test_present: list[str] = []
  test_source = sources.get("test")
  if test_source is not None:
    test_ids, test_present = _test_ids(data_dir, test_source, problems)

  _check_shared_ids(train_ids or [], test_ids, depths, problems)

  # Decode every PNG once, in one pool, so train and test decoding overlap.
  entries = []
  for row in train_rows:
    for sub, kind in (("images", "image"), ("masks", "mask")):
      entries.append((train_source, sub, train_ids[row], kind))
  for id_ in test_present:
    entries.append((test_source, "images", id_, "image"))
  loaded = png_sources.load_many(entries)
  for (source, sub, stem, _), (_, issues) in zip(entries, loaded):
    for issue in issues:
      problems.add("bad PNG files", f"{source.name(sub, stem)} {issue}")

  images, masks = _train_arrays(
      [train_ids[row] for row in train_rows], loaded, rle_masks, train_source, problems
  )
  test_images = {id_: loaded[2 * len(train_rows) + i][0] for i, id_ in enumerate(test_present)}

  if problems:
    return None
  return SaltData(
      train_ids=list(train_ids),
      train_images=_stack([images[i] for i in train_ids]),
      train_masks=_stack([masks[i] for i in train_ids]),
      train_depths=np.array([depths[i] for i in train_ids], np.int64),
      test_ids=list(test_ids),
      test_images=_stack([test_images[i] for i in test_ids]),
      test_depths=np.array([depths[i] for i in test_ids], np.int64),
  )


def _read_train_csv(
    data_dir: str, problems: problems_lib.Problems
) -> tuple[list[str] | None, dict[str, np.ndarray | None]]:
  """train.csv's ids (None when it cannot be read) and each id's decoded RLE."""
  train_ids: list[str] | None = None
  rle_masks: dict[str, np.ndarray | None] = {}
  frame = _read_csv(data_dir, "train.csv", _TRAIN_CSV_COLUMNS, problems)
  if frame is not None:
    train_ids = list(frame["id"])
    _check_ids("train.csv", train_ids, problems)
    if not train_ids:
      problems.add("bad csv files", "train.csv has no rows")
    for id_, text in zip(train_ids, frame["rle_mask"]):
      if not id_ or id_ in rle_masks:
        continue
      try:
        rle_masks[id_] = rle.decode(text, (IMAGE_SIZE, IMAGE_SIZE))
      except rle.RLEError as e:
        rle_masks[id_] = None
        problems.add("bad RLE", f"train.csv rle_mask for id {id_!r} is invalid: {e}")
  return train_ids, rle_masks


def _train_rows(
    train_ids: list[str], train_source: png_sources.PngSource, problems: problems_lib.Problems
) -> list[int]:
  """Rows of train ids whose image and mask both exist, in train.csv order.

  Ids without both, and PNGs without a row, are reported.
  """
  train_rows: list[int] = []
  stems = {sub: train_source.stems(sub) for sub in ("images", "masks")}
  known = set(train_ids)
  seen = set()
  for row, id_ in enumerate(train_ids):
    if id_ in seen:
      continue  # A duplicated row is reported once and decoded once.
    seen.add(id_)
    missing = [train_source.name(sub, id_) for sub in ("images", "masks") if id_ not in stems[sub]]
    if missing:
      problems.add(
          "missing images or masks", f"train.csv id {id_!r} has no {' and no '.join(missing)}"
      )
    elif id_:
      train_rows.append(row)
  for sub in ("images", "masks"):
    for stem in sorted(stems[sub] - known):
      problems.add(f"extra {sub}", f"{train_source.name(sub, stem)} has no row in train.csv")
  return train_rows


def _test_ids(
    data_dir: str, test_source: png_sources.PngSource, problems: problems_lib.Problems
) -> tuple[list[str], list[str]]:
  """The test ids (sample_submission.csv's, else the test PNGs'), and those with a PNG."""
  test_ids: list[str] = []
  test_stems = test_source.stems("images")
  sample_path = os.path.join(data_dir, "sample_submission.csv")
  source = test_source.where("images")
  if os.path.isfile(sample_path):
    source = "sample_submission.csv"
    frame = _read_csv(data_dir, "sample_submission.csv", None, problems)
    if frame is None:
      source = None  # Already reported; an empty id list says nothing new.
    else:
      test_ids = list(frame["id"])
      _check_ids("sample_submission.csv", test_ids, problems)
      for id_ in test_ids:
        if id_ and id_ not in test_stems:
          problems.add(
              "missing test images",
              f"sample_submission.csv id {id_!r} has no" f" {test_source.name('images', id_)}",
          )
  else:
    test_ids = sorted(test_stems)
  if not test_ids and source is not None:
    empty = "has no rows" if source == "sample_submission.csv" else "has no PNG files"
    problems.add("missing files", f"{source} {empty}; there are no test ids")
  test_present = [i for i in dict.fromkeys(test_ids) if i in test_stems]
  return test_ids, test_present


def _check_shared_ids(
    train_ids: list[str],
    test_ids: list[str],
    depths: dict[str, int | None] | None,
    problems: problems_lib.Problems,
) -> None:
  """No id both train and test; every id has a depth (when depths.csv was read)."""
  both = sorted(set(train_ids) & set(test_ids) - {""})
  if both:
    problems.add(
        "ids in both train and test",
        f"{len(both)} test id(s) are also train ids (a test image must not be"
        f" trained on): {_short(both)}",
    )

  if depths is not None:
    for name, ids in (("train.csv", train_ids), ("test", test_ids)):
      for id_ in dict.fromkeys(ids):
        if id_ and id_ not in depths:
          problems.add("ids missing from depths.csv", f"{name} id {id_!r} has no row in depths.csv")


def _train_arrays(
    ids: list[str],
    loaded: list,
    rle_masks: dict[str, np.ndarray | None],
    train_source: png_sources.PngSource,
    problems: problems_lib.Problems,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """The decoded train images and masks by id (`loaded` holds an image, then its
  mask, for each id); each mask is checked against its RLE."""
  images: dict[str, np.ndarray] = {}
  masks: dict[str, np.ndarray] = {}
  for i, id_ in enumerate(ids):
    image, mask = loaded[2 * i][0], loaded[2 * i + 1][0]
    rle_mask = rle_masks[id_]
    if mask is not None and rle_mask is not None:
      differ = int(np.count_nonzero(rle_mask != mask))
      if differ:
        problems.add(
            "RLE/mask disagreements",
            f"train.csv rle_mask for id {id_!r} disagrees with"
            f" {train_source.name('masks', id_)} in {differ}"
            " pixel(s)",
        )
    if image is not None:
      images[id_] = image
    if mask is not None:
      masks[id_] = mask
  return images, masks


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
  if not arrays:
    return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
  return np.stack(arrays).astype(np.uint8, copy=False)


def validate_layout(data_dir, check_test: bool = True) -> list[str]:
  """Every problem in data_dir, one human-readable line each; [] when fine.

  Args:
    data_dir: the directory holding train.csv, depths.csv, train/ and test/
      (or train.zip and test.zip in their place).
    check_test: also check test/images and sample_submission.csv.

  Returns:
    The full list of problems (not summarised), each naming files or ids.
  """
  problems, _ = _scan(data_dir, check_test)
  return problems.lines()


def read_layout(data_dir, load_test: bool = True) -> SaltData:
  """Validates data_dir and reads it, decoding each PNG once.

  Args:
    data_dir: the directory holding train.csv, depths.csv, train/ and test/
      (or train.zip and test.zip in their place).
    load_test: also check and read the test images; when False, test_ids is
      empty and the test arrays have length 0.

  Returns:
    SaltData with train data in train.csv order and test data in
    sample_submission.csv order (sorted file names when it is absent).

  Raises:
    DataError: listing all problems found (long lists summarised; the full
      list is in its `problems` attribute).
  """
  problems, data = _scan(data_dir, load_test)
  if problems:
    raise DataError(problems.message(os.fspath(data_dir)), problems.lines())
  return data


def read_test_images(data_dir) -> SaltData:
  """The test images of a Kaggle-layout directory, alone (predicting new images).

  Reads `test/images/*.png` (or `test.zip`), in `sample_submission.csv` order
  when that file is there, else sorted by id; train files are not needed.
  Every problem is reported at once, as `read_layout` does.
  """
  problems = problems_lib.Problems()
  data_dir = os.fspath(data_dir)
  source = png_sources.open_part(data_dir, "test", ("images",), problems)
  test_ids: list[str] = []
  loaded = []
  try:
    if source is not None:
      stems = source.stems("images")
      if os.path.isfile(os.path.join(data_dir, "sample_submission.csv")):
        frame = _read_csv(data_dir, "sample_submission.csv", None, problems)
        test_ids = list(frame["id"]) if frame is not None else []
        _check_ids("sample_submission.csv", test_ids, problems)
        for id_ in test_ids:
          if id_ not in stems:
            problems.add(
                "missing test images",
                f"sample_submission.csv id {id_!r} has" f" no {source.name('images', id_)}",
            )
      else:
        test_ids = sorted(stems)
      if not test_ids:
        problems.add("missing files", f"{source.where('images')} has no test images")
      entries = [(source, "images", i, "image") for i in test_ids if i in stems]
      loaded = png_sources.load_many(entries)
      for (src, sub, stem, _), (_, issues) in zip(entries, loaded):
        for issue in issues:
          problems.add("bad PNG files", f"{src.name(sub, stem)} {issue}")
  finally:
    if source is not None:
      source.close()
  if problems:
    raise DataError(problems.message(data_dir), problems.lines())
  empty = np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
  return SaltData(
      train_ids=[],
      train_images=empty,
      train_masks=empty,
      train_depths=np.zeros(0, np.int64),
      test_ids=test_ids,
      test_images=_stack([image for image, _ in loaded]),
      test_depths=np.zeros(len(test_ids), np.int64),
  )

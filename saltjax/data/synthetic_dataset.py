"""Writes the synthetic stand-in for the Kaggle TGS Salt data in the Kaggle layout.

The examples are drawn by `saltjax.data.synthetic`; this module writes a data set
of them in exactly the Kaggle layout::

  train.csv                 id,rle_mask
  depths.csv                id,z (every train and test id)
  train/images/<id>.png     101x101 8-bit gray
  train/masks/<id>.png      101x101 8-bit, 0 or 255
  test/images/<id>.png      101x101 8-bit gray
  sample_submission.csv     id,rle_mask (test ids, placeholder RLE "1 1")

`ensure_dataset` keeps one copy of each size and seed in a cache directory.  As a
command, `python -m saltjax.data.synthetic_dataset OUT_DIR` writes one (see `--help`).
"""

from __future__ import annotations

import argparse
import csv
import errno
import os
import pathlib
import shutil
import sys
import uuid

import cv2
import numpy as np

from saltjax.data import rle
from saltjax.data import synthetic

# Kaggle's sample submission puts this placeholder in every row.
_SAMPLE_RLE = "1 1"

_TRAIN, _TEST = 0, 1


def _make_ids(seed: int, count: int) -> list[str]:
  """`count` distinct 10-hex-digit ids, determined by the seed alone."""
  # Its own stream, so that ids do not depend on the examples' draws.
  rng = np.random.default_rng([seed, 0x1D5])
  ids, seen = [], set()
  while len(ids) < count:
    for value in rng.integers(0, 16**10, count - len(ids)):
      name = f"{int(value):010x}"
      if name not in seen:
        seen.add(name)
        ids.append(name)
  return ids


def _example_rng(seed: int, split: int, index: int) -> np.random.Generator:
  # One stream per example: example i is the same whatever the dataset size.
  return np.random.default_rng([seed, split, index])


def _write_png(path: pathlib.Path, array: np.ndarray) -> None:
  if not cv2.imwrite(str(path), array):
    raise OSError(f"could not write {path}")


def _write_csv(path: pathlib.Path, header: list[str], rows) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)


def _write_examples(root: pathlib.Path, seed: int, split: int, start: int, names: list[str]):
  """Examples start, start + 1, ... of a split, written; their (name, rle, depth) rows."""
  rows = []
  for i, name in enumerate(names, start):
    image, mask, depth = synthetic.generate_example(_example_rng(seed, split, i))
    if split == _TRAIN:
      _write_png(root / "train/images" / f"{name}.png", image)
      _write_png(root / "train/masks" / f"{name}.png", mask * np.uint8(255))
      rows.append((name, rle.encode(mask), depth))
    else:
      _write_png(root / "test/images" / f"{name}.png", image)
      rows.append((name, None, depth))
  return rows


# Examples a worker process writes at a time; a set of up to 2 * _CHUNK examples
# is written by one process.
_CHUNK = 1000


def _fill(root: pathlib.Path, num_train: int, num_test: int, seed: int) -> None:
  """Writes the whole layout under `root` (which must exist).

  Example i is a function of (seed, split, i) alone, so a large set (the
  Kaggle size: 22,000 images, about 6 minutes on one core) is written by a
  pool of processes, one per core, with the same result.
  """
  for sub in ("train/images", "train/masks", "test/images"):
    (root / sub).mkdir(parents=True)
  ids = _make_ids(seed, num_train + num_test)
  jobs = [
      (root, seed, split, start, names[start : start + _CHUNK])
      for split, names in ((_TRAIN, ids[:num_train]), (_TEST, ids[num_train:]))
      for start in range(0, len(names), _CHUNK)
  ]
  # A small set is written here: starting processes would cost more than it saves.
  workers = min(len(jobs), len(os.sched_getaffinity(0)))
  if workers > 1 and num_train + num_test > 2 * _CHUNK:
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no fork of a process running JAX threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
      chunks = list(pool.map(_write_examples, *zip(*jobs)))
  else:
    chunks = [_write_examples(*job) for job in jobs]
  rows = [row for chunk in chunks for row in chunk]
  train_rows = [(name, encoded) for name, encoded, _ in rows[:num_train]]
  depth_rows = [(name, depth) for name, _, depth in rows]
  _write_csv(root / "train.csv", ["id", "rle_mask"], train_rows)
  _write_csv(root / "depths.csv", ["id", "z"], depth_rows)
  _write_csv(
      root / "sample_submission.csv",
      ["id", "rle_mask"],
      [(name, _SAMPLE_RLE) for name in ids[num_train:]],
  )


def write_dataset(
    out_dir: str | os.PathLike, num_train: int, num_test: int, seed: int = 0
) -> pathlib.Path:
  """Writes a synthetic dataset in the Kaggle layout to `out_dir`.

  The dataset is built in a hidden temporary sibling directory and renamed into
  place, so `out_dir` either does not exist or holds a complete dataset, even
  if the process dies half way.

  Args:
    out_dir: Directory to create; its parent is created if needed.
    num_train: Number of training images (with masks).
    num_test: Number of test images.
    seed: Everything written is a function of the seed and the counts.
      Example i of a split (image, mask, depth) depends only on the seed, and
      so do the train ids; the test ids follow the train ids in one stream.

  Returns:
    `out_dir` as a pathlib.Path.

  Raises:
    FileExistsError: `out_dir` already exists and is not empty (for instance
      another process finished writing it first).
  """
  if num_train < 0 or num_test < 0:
    raise ValueError(f"counts must be >= 0, got {num_train}, {num_test}")
  out_dir = pathlib.Path(out_dir)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
  tmp.mkdir()
  try:
    _fill(tmp, num_train, num_test, seed)
    try:
      # Atomic on POSIX; fails, rather than merging, onto a non-empty dir.
      os.rename(tmp, out_dir)
    except OSError as e:
      if e.errno in (errno.EEXIST, errno.ENOTEMPTY) or out_dir.exists():
        raise FileExistsError(errno.EEXIST, "dataset already exists", str(out_dir)) from e
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def dataset_name(num_train: int, num_test: int, seed: int) -> str:
  """The directory name `ensure_dataset` uses under its cache directory."""
  return f"synthetic-v{synthetic.VERSION}-n{num_train}-t{num_test}-s{seed}"


def ensure_dataset(
    cache_dir: str | os.PathLike, num_train: int = 1000, num_test: int = 500, seed: int = 0
) -> pathlib.Path:
  """Returns a cached synthetic dataset, generating it on first use.

  The dataset lives in `cache_dir / dataset_name(num_train, num_test, seed)`.
  Since `write_dataset` renames a finished dataset into place, an existing
  directory is complete; when two processes race, the loser's rename fails and
  it uses the winner's copy.
  """
  path = pathlib.Path(cache_dir) / dataset_name(num_train, num_test, seed)
  if path.is_dir():
    return path
  try:
    return write_dataset(path, num_train, num_test, seed)
  except FileExistsError:
    if path.is_dir():
      return path
    raise


def preview(num: int = 16, seed: int = 0) -> np.ndarray:
  """A BGR grid of `num` training examples with salt outlined in red."""
  tiles = []
  for i in range(num):
    image, mask, _ = synthetic.generate_example(_example_rng(seed, _TRAIN, i))
    tile = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(tile, contours, -1, (0, 0, 255), 1)
    tile = cv2.resize(tile, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    tiles.append(cv2.copyMakeBorder(tile, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=(255, 255, 255)))
  cols = int(np.ceil(np.sqrt(num)))
  blank = np.full_like(tiles[0], 255)
  tiles += [blank] * (-len(tiles) % cols)
  return np.vstack([np.hstack(tiles[r : r + cols]) for r in range(0, len(tiles), cols)])


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out_dir")
  parser.add_argument("--num_train", type=int, default=1000)
  parser.add_argument("--num_test", type=int, default=500)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--preview", help="also write a preview grid PNG here")
  args = parser.parse_args(argv)
  path = write_dataset(args.out_dir, args.num_train, args.num_test, args.seed)
  print(path)
  if args.preview:
    _write_png(pathlib.Path(args.preview), preview(16, args.seed))


if __name__ == "__main__":
  main(sys.argv[1:])

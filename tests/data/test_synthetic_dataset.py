"""Tests for the synthetic dataset writer (saltjax.data.synthetic_dataset)."""

from __future__ import annotations

import csv
import pathlib
import re
import struct

import cv2
import numpy as np
import pytest

from saltjax.data import rle
from saltjax.data import synthetic
from saltjax.data import synthetic_dataset

_ID = re.compile(r"^[0-9a-f]{10}$")


def _read_csv(path: pathlib.Path) -> tuple[list[str], list[list[str]]]:
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  return rows[0], rows[1:]


def _png_header(path: pathlib.Path) -> tuple[int, int, int, int]:
  """(width, height, bit depth, colour type) from the PNG's IHDR chunk."""
  data = path.read_bytes()[:26]
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
  width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
  return width, height, depth, colour


def _tree(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _leftovers(directory: pathlib.Path) -> list[str]:
  return [p.name for p in directory.iterdir() if ".tmp-" in p.name]


def test_write_dataset_writes_the_kaggle_layout(tmp_path):
  out = synthetic_dataset.write_dataset(tmp_path / "data", num_train=24, num_test=7, seed=5)
  assert out == tmp_path / "data"
  assert sorted(p.name for p in out.iterdir()) == [
      "depths.csv",
      "sample_submission.csv",
      "test",
      "train",
      "train.csv",
  ]
  assert sorted(p.name for p in (out / "train").iterdir()) == ["images", "masks"]
  assert [p.name for p in (out / "test").iterdir()] == ["images"]
  assert not _leftovers(tmp_path)

  header, rows = _read_csv(out / "train.csv")
  assert header == ["id", "rle_mask"]
  assert len(rows) == 24 and all(len(r) == 2 for r in rows)
  train_ids = [r[0] for r in rows]
  header, sub_rows = _read_csv(out / "sample_submission.csv")
  assert header == ["id", "rle_mask"]
  test_ids = [r[0] for r in sub_rows]
  assert len(test_ids) == 7 and all(r[1] == "1 1" for r in sub_rows)
  all_ids = train_ids + test_ids
  assert all(_ID.match(i) for i in all_ids), all_ids
  assert len(set(all_ids)) == 31

  assert {p.stem for p in (out / "train/images").iterdir()} == set(train_ids)
  assert {p.stem for p in (out / "train/masks").iterdir()} == set(train_ids)
  assert {p.stem for p in (out / "test/images").iterdir()} == set(test_ids)
  paths = (
      [out / "train/images" / f"{i}.png" for i in train_ids]
      + [out / "train/masks" / f"{i}.png" for i in train_ids]
      + [out / "test/images" / f"{i}.png" for i in test_ids]
  )
  for path in paths:
    assert _png_header(path) == (101, 101, 8, 0), path  # 8-bit grayscale.

  sizes = []
  for name, encoded in rows:
    mask = cv2.imread(str(out / "train/masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
    assert mask.dtype == np.uint8 and mask.shape == (101, 101)
    assert set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(rle.decode(encoded, (101, 101)), (mask // 255).astype(np.uint8))
    assert (encoded == "") == (not mask.any())
    sizes.append(int(mask.astype(bool).sum()))
  # Both empty and salt images, as in the real data (fixed seed).
  assert 0 in sizes and max(sizes) > 0

  header, depth_rows = _read_csv(out / "depths.csv")
  assert header == ["id", "z"]
  depths = dict(depth_rows)
  assert sorted(depths) == sorted(all_ids) and len(depth_rows) == 31
  assert all(re.match(r"^\d+$", z) and 50 <= int(z) <= 960 for z in depths.values())


def test_write_dataset_is_deterministic(tmp_path):
  first = _tree(synthetic_dataset.write_dataset(tmp_path / "a", 6, 3, seed=11))
  second = _tree(synthetic_dataset.write_dataset(tmp_path / "b", 6, 3, seed=11))
  assert first == second
  other = _tree(synthetic_dataset.write_dataset(tmp_path / "c", 6, 3, seed=12))
  _, rows_a = _read_csv(tmp_path / "a/train.csv")
  _, rows_c = _read_csv(tmp_path / "c/train.csv")
  assert not {r[0] for r in rows_a} & {r[0] for r in rows_c}
  images_a = sorted(v for k, v in first.items() if k.startswith("train/images"))
  images_c = sorted(v for k, v in other.items() if k.startswith("train/images"))
  assert not set(images_a) & set(images_c)


def test_a_pool_of_processes_writes_the_same_dataset(tmp_path, monkeypatch):
  """Example i depends on (seed, split, i) alone: chunks written by worker
  processes give the same files as one process writing them in turn."""
  monkeypatch.setattr(synthetic_dataset, "_CHUNK", 4)  # 9 + 5 examples: 5 chunks, a pool
  monkeypatch.setattr(synthetic_dataset.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
  pooled = _tree(synthetic_dataset.write_dataset(tmp_path / "pooled", 9, 5, seed=2))
  monkeypatch.setattr(synthetic_dataset, "_CHUNK", 100)  # one chunk a split
  monkeypatch.setattr(synthetic_dataset.os, "sched_getaffinity", lambda pid: {0}, raising=False)
  alone = _tree(synthetic_dataset.write_dataset(tmp_path / "alone", 9, 5, seed=2))
  assert pooled == alone
  assert len([k for k in pooled if k.startswith("train/images")]) == 9


def test_write_dataset_refuses_an_existing_dataset(tmp_path):
  target = tmp_path / "data"
  target.mkdir()
  (target / "keep.txt").write_text("theirs")
  with pytest.raises(FileExistsError):
    synthetic_dataset.write_dataset(target, 2, 1)
  assert [p.name for p in target.iterdir()] == ["keep.txt"]
  assert not _leftovers(tmp_path)


def test_write_dataset_crash_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
  real_fill = synthetic_dataset._fill

  def crashing_fill(root, *args):
    real_fill(root, *args)
    raise RuntimeError("disk full")

  monkeypatch.setattr(synthetic_dataset, "_fill", crashing_fill)
  with pytest.raises(RuntimeError, match="disk full"):
    synthetic_dataset.write_dataset(tmp_path / "data", 3, 2)
  assert list(tmp_path.iterdir()) == []


def test_ensure_dataset_generates_once_then_uses_the_cache(tmp_path, monkeypatch):
  path = synthetic_dataset.ensure_dataset(tmp_path, num_train=4, num_test=2, seed=1)
  assert path == tmp_path / f"synthetic-v{synthetic.VERSION}-n4-t2-s1"
  assert (path / "train.csv").is_file()
  mtimes = {p: p.stat().st_mtime_ns for p in path.rglob("*")}

  def must_not_run(*args, **kwargs):
    raise AssertionError("regenerated a cached dataset")

  monkeypatch.setattr(synthetic_dataset, "write_dataset", must_not_run)
  assert synthetic_dataset.ensure_dataset(tmp_path, 4, 2, seed=1) == path
  assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == mtimes


def test_ensure_dataset_uses_the_copy_of_a_process_that_won_the_race(tmp_path, monkeypatch):
  real_fill = synthetic_dataset._fill
  final = tmp_path / synthetic_dataset.dataset_name(3, 1, 0)

  def slow_fill(root, *args):
    real_fill(root, *args)
    # Another process finishes first and renames its copy into place.
    other = tmp_path / ".other"
    real_fill(other, *args)
    (other / "winner.txt").write_text("theirs")
    other.rename(final)

  monkeypatch.setattr(synthetic_dataset, "_fill", slow_fill)
  assert synthetic_dataset.ensure_dataset(tmp_path, 3, 1, seed=0) == final
  assert (final / "winner.txt").read_text() == "theirs"
  assert [p.name for p in tmp_path.iterdir()] == [final.name]

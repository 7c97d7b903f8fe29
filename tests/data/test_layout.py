"""Tests for saltjax.data.layout on tiny hand-built data directories."""

import os
import pathlib
import shutil
import zipfile

import cv2
import numpy as np
import pytest

from saltjax.data import layout
from saltjax.data import rle

SIZE = layout.IMAGE_SIZE
TRAIN_IDS = ["a1f0", "b2e1", "c3d2", "d4c3"]
# Deliberately not sorted, to tell sample_submission order from file order.
TEST_IDS = ["t2", "t1", "t3"]
DEPTHS = {
    "a1f0": 120,
    "b2e1": 345,
    "c3d2": 7,
    "d4c3": 980,
    "t1": 501,
    "t2": 502,
    "t3": 503,
    "unused": 1,
}


def _image(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE), np.uint8)


def _masks() -> dict[str, np.ndarray]:
  """Hand-made masks: a block, an empty one, a stripe, a single pixel."""
  masks = {i: np.zeros((SIZE, SIZE), np.uint8) for i in TRAIN_IDS}
  masks["a1f0"][10:40, 20:60] = 1
  masks["c3d2"][:, 50:53] = 1
  masks["d4c3"][100, 100] = 1
  return masks


def _write_csv(path: pathlib.Path, header: str, rows) -> None:
  lines = [header] + [",".join(map(str, row)) for row in rows]
  path.write_text("\n".join(lines) + "\n")


def _write_train_csv(root: pathlib.Path, rows) -> None:
  _write_csv(root / "train.csv", "id,rle_mask", rows)


def _train_rows(masks):
  return [(i, rle.encode(masks[i])) for i in TRAIN_IDS]


def _make_valid(root: pathlib.Path, sample_submission: bool = True) -> pathlib.Path:
  """Writes a valid directory; returns it."""
  masks = _masks()
  for sub in ("train/images", "train/masks", "test/images"):
    (root / sub).mkdir(parents=True)
  for n, id_ in enumerate(TRAIN_IDS):
    cv2.imwrite(str(root / "train/images" / f"{id_}.png"), _image(n))
    cv2.imwrite(str(root / "train/masks" / f"{id_}.png"), masks[id_] * 255)
  for n, id_ in enumerate(TEST_IDS):
    cv2.imwrite(str(root / "test/images" / f"{id_}.png"), _image(100 + n))
  _write_train_csv(root, _train_rows(masks))
  # Shuffled, with an id used nowhere, as in the Kaggle file.
  _write_csv(root / "depths.csv", "id,z", sorted(DEPTHS.items(), key=lambda kv: kv[1] % 7))
  if sample_submission:
    _write_csv(root / "sample_submission.csv", "id,rle_mask", [(i, "1 1") for i in TEST_IDS])
  return root


def _expected_test_images(ids):
  return np.stack([_image(100 + TEST_IDS.index(i)) for i in ids])


# ---------------------------------------------------------------------------
# Valid directories.


def test_valid_directory_reads_back_exactly(tmp_path):
  root = _make_valid(tmp_path)
  assert layout.validate_layout(root) == []
  data = layout.read_layout(root)
  assert data.train_ids == TRAIN_IDS
  assert data.train_images.dtype == np.uint8
  assert data.train_images.shape == (4, SIZE, SIZE)
  np.testing.assert_array_equal(data.train_images, np.stack([_image(n) for n in range(4)]))
  assert data.train_masks.dtype == np.uint8
  np.testing.assert_array_equal(data.train_masks, np.stack([_masks()[i] for i in TRAIN_IDS]))
  assert data.train_depths.dtype == np.int64
  assert data.train_depths.tolist() == [DEPTHS[i] for i in TRAIN_IDS]
  assert data.test_ids == TEST_IDS  # sample_submission.csv order.
  np.testing.assert_array_equal(data.test_images, _expected_test_images(TEST_IDS))
  assert data.test_depths.dtype == np.int64
  assert data.test_depths.tolist() == [DEPTHS[i] for i in TEST_IDS]


def test_train_order_follows_train_csv(tmp_path):
  root = _make_valid(tmp_path)
  order = ["d4c3", "a1f0", "c3d2", "b2e1"]
  masks = _masks()
  _write_train_csv(root, [(i, rle.encode(masks[i])) for i in order])
  data = layout.read_layout(root)
  assert data.train_ids == order
  np.testing.assert_array_equal(
      data.train_images, np.stack([_image(TRAIN_IDS.index(i)) for i in order])
  )
  assert data.train_depths.tolist() == [DEPTHS[i] for i in order]


def test_test_ids_are_sorted_file_names_without_sample_submission(tmp_path):
  root = _make_valid(tmp_path, sample_submission=False)
  data = layout.read_layout(root)
  assert data.test_ids == sorted(TEST_IDS)
  np.testing.assert_array_equal(data.test_images, _expected_test_images(sorted(TEST_IDS)))
  assert data.test_depths.tolist() == [DEPTHS[i] for i in sorted(TEST_IDS)]


def test_three_equal_channels_and_16_bit_and_0_1_masks_accepted(tmp_path):
  root = _make_valid(tmp_path)
  gray = _image(0)
  cv2.imwrite(str(root / "train/images/a1f0.png"), np.repeat(gray[:, :, None], 3, axis=2))
  cv2.imwrite(str(root / "test/images/t1.png"), np.repeat(_image(101)[:, :, None], 3, axis=2))
  masks = _masks()
  cv2.imwrite(str(root / "train/masks/a1f0.png"), masks["a1f0"].astype(np.uint16) * 65535)
  cv2.imwrite(str(root / "train/masks/c3d2.png"), masks["c3d2"].astype(np.uint16))
  cv2.imwrite(str(root / "train/masks/d4c3.png"), masks["d4c3"])  # 0 and 1.
  assert cv2.imread(str(root / "train/masks/a1f0.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
  data = layout.read_layout(root)
  np.testing.assert_array_equal(data.train_images[0], gray)
  np.testing.assert_array_equal(data.test_images, _expected_test_images(TEST_IDS))
  np.testing.assert_array_equal(data.train_masks, np.stack([masks[i] for i in TRAIN_IDS]))


def test_load_test_false_skips_test_directory(tmp_path):
  root = _make_valid(tmp_path)
  (root / "test/images/t1.png").write_bytes(b"not a png")
  assert layout.validate_layout(root, check_test=False) == []
  data = layout.read_layout(root, load_test=False)
  assert data.train_ids == TRAIN_IDS
  assert data.test_ids == []
  assert data.test_images.shape == (0, SIZE, SIZE)
  assert data.test_depths.shape == (0,)
  with pytest.raises(layout.DataError, match="test/images/t1.png"):
    layout.read_layout(root)


def test_read_image_and_read_mask(tmp_path):
  path = tmp_path / "x.png"
  cv2.imwrite(str(path), _image(5))
  np.testing.assert_array_equal(layout.read_image(path), _image(5))
  mask = _masks()["a1f0"]
  cv2.imwrite(str(path), mask.astype(np.uint16) * 65535)
  got = layout.read_mask(str(path))
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, mask)
  cv2.imwrite(str(path), np.zeros((64, 64), np.uint8))
  with pytest.raises(layout.DataError, match=r"x\.png.*64x64"):
    layout.read_image(path)
  path.write_bytes(b"")
  with pytest.raises(layout.DataError, match=r"x\.png"):
    layout.read_mask(path)


# ---------------------------------------------------------------------------
# Broken directories: each is the valid one with a single mutation.


def _remove(rel):
  return lambda root: os.remove(root / rel)


def _truncate(rel):
  def mutate(root):
    data = (root / rel).read_bytes()
    (root / rel).write_bytes(data[: len(data) // 2])

  return mutate


def _write_png(rel, array):
  return lambda root: cv2.imwrite(str(root / rel), array)


def _write_text(rel, text):
  return lambda root: (root / rel).write_text(text)


def _set_rle(id_, text):
  def mutate(root):
    rows = _train_rows(_masks())
    _write_train_csv(root, [(i, text if i == id_ else r) for i, r in rows])

  return mutate


def _unequal_rgb():
  color = np.repeat(_image(0)[:, :, None], 3, axis=2)
  color[:, :, 2] = 255 - color[:, :, 2]
  return color


def _mask_with(value, dtype=np.uint8):
  mask = _masks()["a1f0"].astype(dtype) * value
  mask[0, 0] = 7
  return mask


def _drop_depth(id_):
  rows = [(i, z) for i, z in DEPTHS.items() if i != id_]
  return lambda root: _write_csv(root / "depths.csv", "id,z", rows)


def _zip_only(root):
  for rel in ("train/images", "train/masks"):
    for f in (root / rel).iterdir():
      f.unlink()
    (root / rel).rmdir()
  (root / "train").rmdir()
  (root / "train.zip").write_bytes(b"PK\x05\x06" + bytes(18))


def _rmtree(rel):
  def mutate(root):
    for f in (root / rel).iterdir():
      f.unlink()
    (root / rel).rmdir()

  return mutate


BROKEN = [
    (
        "test_id_is_a_train_id",
        lambda root: [
            _write_png("test/images/b2e1.png", _image(5))(root),
            open(root / "sample_submission.csv", "a").write("b2e1,1 1\n"),
            open(root / "depths.csv", "a").write("b2e1,345\n"),
        ],
        ["test id(s) are also train ids", "b2e1"],
    ),
    ("missing_mask", _remove("train/masks/b2e1.png"), ["train/masks/b2e1.png", "b2e1"]),
    ("missing_image", _remove("train/images/c3d2.png"), ["train/images/c3d2.png"]),
    (
        "extra_image",
        _write_png("train/images/zz99.png", _image(9)),
        ["train/images/zz99.png", "no row in train.csv"],
    ),
    ("extra_mask", _write_png("train/masks/zz99.png", _masks()["b2e1"]), ["train/masks/zz99.png"]),
    ("truncated_png", _truncate("train/images/a1f0.png"), ["train/images/a1f0.png", "truncated"]),
    ("truncated_mask", _truncate("train/masks/a1f0.png"), ["train/masks/a1f0.png"]),
    ("truncated_test_png", _truncate("test/images/t3.png"), ["test/images/t3.png"]),
    ("not_a_png", _write_text("train/images/d4c3.png", "hello"), ["train/images/d4c3.png"]),
    (
        "64x64_image",
        _write_png("train/images/b2e1.png", np.zeros((64, 64), np.uint8)),
        ["train/images/b2e1.png", "64x64"],
    ),
    (
        "64x64_test_image",
        _write_png("test/images/t1.png", np.zeros((64, 64), np.uint8)),
        ["test/images/t1.png", "64x64"],
    ),
    (
        "rgba_image",
        _write_png("train/images/a1f0.png", np.zeros((SIZE, SIZE, 4), np.uint8)),
        ["train/images/a1f0.png", "RGBA"],
    ),
    (
        "unequal_rgb",
        _write_png("train/images/c3d2.png", _unequal_rgb()),
        ["train/images/c3d2.png", "not equal"],
    ),
    (
        "16_bit_image",
        _write_png("train/images/c3d2.png", _image(2).astype(np.uint16) * 256),
        ["train/images/c3d2.png", "16-bit"],
    ),
    (
        "mask_value_7",
        _write_png("train/masks/a1f0.png", _mask_with(255)),
        ["train/masks/a1f0.png", "0, 7, 255"],
    ),
    (
        "16_bit_mask_value_7",
        _write_png("train/masks/a1f0.png", _mask_with(65535, np.uint16)),
        ["train/masks/a1f0.png", "0, 7, 65535", "16-bit"],
    ),
    ("malformed_rle", _set_rle("b2e1", "1 2 3"), ["b2e1", "rle_mask"]),
    ("non_integer_rle", _set_rle("b2e1", "1 x"), ["b2e1"]),
    ("out_of_range_rle", _set_rle("c3d2", "10200 5"), ["c3d2", "10204"]),
    (
        "rle_disagrees_with_mask",
        _set_rle("a1f0", "1 10"),
        ["a1f0", "train/masks/a1f0.png", "1210 pixel(s)"],
    ),
    (
        "duplicate_train_id",
        lambda root: _write_train_csv(root, _train_rows(_masks()) + [_train_rows(_masks())[2]]),
        ["train.csv", "c3d2", "2 times"],
    ),
    (
        "duplicate_depth_id",
        lambda root: _write_csv(root / "depths.csv", "id,z", list(DEPTHS.items()) + [("d4c3", 3)]),
        ["depths.csv", "d4c3", "2 times"],
    ),
    (
        "duplicate_sample_id",
        lambda root: _write_csv(
            root / "sample_submission.csv", "id,rle_mask", [(i, "") for i in TEST_IDS + ["t1"]]
        ),
        ["sample_submission.csv", "t1", "2 times"],
    ),
    ("train_id_missing_from_depths", _drop_depth("b2e1"), ["b2e1", "depths.csv"]),
    ("test_id_missing_from_depths", _drop_depth("t3"), ["t3", "depths.csv"]),
    (
        "non_integer_depth",
        lambda root: _write_csv(
            root / "depths.csv",
            "id,z",
            [(i, "deep" if i == "t3" else z) for i, z in DEPTHS.items()],
        ),
        ["depths.csv", "t3", "deep", "has 1 problem(s)"],
    ),
    (
        "sample_id_without_test_image",
        lambda root: _write_csv(
            root / "sample_submission.csv", "id,rle_mask", [(i, "") for i in TEST_IDS + ["t9"]]
        ),
        ["sample_submission.csv", "t9", "test/images/t9.png"],
    ),
    ("missing_train_csv", _remove("train.csv"), ["train.csv"]),
    ("missing_depths_csv", _remove("depths.csv"), ["depths.csv"]),
    ("missing_test_images_dir", _rmtree("test/images"), ["test/images"]),
    ("missing_train_masks_dir", _rmtree("train/masks"), ["train/masks"]),
    ("wrong_train_header", _write_text("train.csv", "id,mask\na1f0,\n"), ["train.csv", "rle_mask"]),
    ("extra_train_column", _write_text("train.csv", "id,rle_mask,z\na1f0,,3\n"), ["train.csv"]),
    ("wrong_depths_header", _write_text("depths.csv", "id,depth\na1f0,3\n"), ["depths.csv", "'z'"]),
    ("empty_train_csv", _write_text("train.csv", ""), ["train.csv", "empty"]),
    ("only_train_zip", _zip_only, ["train.zip", "unzip"]),
]


@pytest.mark.parametrize("mutate,expected", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_directory_raises_naming_the_culprit(tmp_path, mutate, expected):
  root = _make_valid(tmp_path)
  mutate(root)
  problems = layout.validate_layout(root)
  assert problems, "validate_layout found nothing wrong"
  with pytest.raises(layout.DataError) as info:
    layout.read_layout(root)
  message = str(info.value)
  assert message.startswith(f"data_dir {root} has {len(problems)} problem(s):")
  for text in expected:
    assert text in message, f"{text!r} not in:\n{message}"
  assert info.value.problems == problems


def test_missing_data_dir(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(layout.DataError, match="nowhere.*does not exist"):
    layout.read_layout(missing)
  assert len(layout.validate_layout(missing)) == 1


def test_empty_zips_in_place_of_both_parts_are_reported(tmp_path):
  root = _make_valid(tmp_path)
  _zip_only(root)
  _rmtree("test/images")(root)
  (root / "test").rmdir()
  (root / "test.zip").write_bytes(b"PK\x05\x06" + bytes(18))
  message = "\n".join(layout.validate_layout(root))
  assert "train.zip should hold images/ and masks/" in message
  assert "test.zip should hold images/" in message
  assert str(root / "train") in message and str(root / "test") in message


def test_all_problems_reported_in_one_message(tmp_path):
  root = _make_valid(tmp_path)
  _remove("train/masks/b2e1.png")(root)
  _write_png("test/images/t2.png", np.zeros((SIZE, SIZE, 4), np.uint8))(root)
  _set_rle("d4c3", "1 2 3")(root)
  with pytest.raises(layout.DataError) as info:
    layout.read_layout(root)
  message = str(info.value)
  assert message.startswith(f"data_dir {root} has 3 problem(s):")
  assert "train/masks/b2e1.png" in message
  assert "test/images/t2.png" in message and "RGBA" in message
  assert "d4c3" in message and "odd number" in message


def test_long_lists_are_summarised(tmp_path):
  root = _make_valid(tmp_path)
  for n in range(15):
    cv2.imwrite(str(root / "train/images" / f"x{n:02d}.png"), _image(0))
  _set_rle("a1f0", "1 2 3")(root)
  with pytest.raises(layout.DataError) as info:
    layout.read_layout(root)
  message = str(info.value)
  assert message.startswith(f"data_dir {root} has 16 problem(s):")
  assert "train/images/x09.png" in message
  assert "train/images/x10.png" not in message
  assert "... and 5 more" in message
  assert "a1f0" in message  # Other kinds are still shown.
  assert len(info.value.problems) == 16
  assert any("x14.png" in p for p in info.value.problems)


# ---------------------------------------------------------------------------
# The zips Kaggle serves, read in place of the unpacked folders.


def _zip_part(
    root: pathlib.Path,
    part: str,
    prefix: str = "",
    remove: bool = True,
    extra: dict[str, bytes] | None = None,
) -> pathlib.Path:
  """Zips root/<part>/<sub>/*.png as <prefix><sub>/<name> into <part>.zip."""
  path = root / f"{part}.zip"
  # Members are stored, not deflated (PNGs are compressed already), so that a
  # test can flip a byte of PNG data.
  with zipfile.ZipFile(path, "w") as archive:
    for sub in sorted((root / part).iterdir()):
      archive.writestr(f"{prefix}{sub.name}/", b"")  # A directory entry.
      for png in sorted(sub.iterdir()):
        archive.write(png, f"{prefix}{sub.name}/{png.name}")
    for name, data in (extra or {}).items():
      archive.writestr(name, data)
  if remove:
    shutil.rmtree(root / part)
  return path


def _assert_same_data(got: layout.SaltData, want: layout.SaltData) -> None:
  assert got.train_ids == want.train_ids
  assert got.test_ids == want.test_ids
  for field in ("train_images", "train_masks", "train_depths", "test_images", "test_depths"):
    a, b = getattr(got, field), getattr(want, field)
    assert a.dtype == b.dtype, field
    np.testing.assert_array_equal(a, b, err_msg=field)


@pytest.mark.parametrize("nested", [False, True], ids=["kaggle_top_level", "nested"])
def test_zips_read_like_unpacked_folders(tmp_path, nested):
  root = _make_valid(tmp_path)
  want = layout.read_layout(root)
  for part in ("train", "test"):
    # Kaggle's zips hold images/...; re-zipped copies train/images/....
    _zip_part(root, part, f"{part}/" if nested else "")
  assert not (root / "train").exists() and not (root / "test").exists()
  assert layout.validate_layout(root) == []
  _assert_same_data(layout.read_layout(root), want)


def test_zip_junk_members_are_ignored(tmp_path):
  root = _make_valid(tmp_path)
  want = layout.read_layout(root)
  junk = {
      "__MACOSX/images/._a1f0.png": b"junk",
      "images/._a1f0.png": b"junk",
      "images/notes.txt": b"hi",
      "other/images/zz.png": b"not here",
  }
  _zip_part(root, "train", extra=junk)
  _assert_same_data(layout.read_layout(root), want)


def test_unpacked_folders_win_over_zips(tmp_path):
  root = _make_valid(tmp_path)
  want = layout.read_layout(root)
  (root / "train.zip").write_bytes(b"not a zip at all")
  _zip_part(root, "test", remove=False, extra={"images/zz.png": b"bad"})
  assert layout.validate_layout(root) == []
  _assert_same_data(layout.read_layout(root), want)


def test_zip_used_when_the_folder_is_incomplete(tmp_path):
  root = _make_valid(tmp_path)
  want = layout.read_layout(root)
  _zip_part(root, "train", remove=False)
  _rmtree("train/masks")(root)  # train/images alone is not enough.
  _assert_same_data(layout.read_layout(root), want)


def test_load_test_false_ignores_a_broken_test_zip(tmp_path):
  root = _make_valid(tmp_path)
  shutil.rmtree(root / "test")
  (root / "test.zip").write_bytes(b"garbage")
  assert layout.validate_layout(root, check_test=False) == []
  assert layout.read_layout(root, load_test=False).train_ids == TRAIN_IDS
  with pytest.raises(layout.DataError, match="test.zip is not a readable zip"):
    layout.read_layout(root)


def _rewrite_train_zip(root: pathlib.Path, change) -> None:
  """Rewrites train.zip with change({member: bytes}) applied to its members."""
  zip_path = root / "train.zip"
  with zipfile.ZipFile(zip_path) as archive:
    contents = {i.filename: archive.read(i) for i in archive.infolist()}
  change(contents)
  with zipfile.ZipFile(zip_path, "w") as archive:
    for name, data in contents.items():
      archive.writestr(name, data)


def _set_member(member, data):
  def change(contents):
    contents[member] = data

  return lambda root: _rewrite_train_zip(root, change)


def _truncate_member(member):
  def change(contents):
    contents[member] = contents[member][: len(contents[member]) // 2]

  return lambda root: _rewrite_train_zip(root, change)


def _drop_members(prefix):
  def change(contents):
    for name in [n for n in contents if n.startswith(prefix)]:
      del contents[name]

  return lambda root: _rewrite_train_zip(root, change)


def _second_copy_nested(root):
  def change(contents):
    contents.update({f"train/{n}": d for n, d in list(contents.items())})

  _rewrite_train_zip(root, change)


def _corrupt_member_data(member):
  """Flips a byte inside a stored member, so that its CRC check fails."""

  def mutate(root):
    zip_path = root / "train.zip"
    with zipfile.ZipFile(zip_path) as archive:
      info = archive.getinfo(member)
    assert info.compress_type == zipfile.ZIP_STORED
    raw = bytearray(zip_path.read_bytes())
    # A local header is 30 bytes, the name and an extra field; then the data.
    offset = info.header_offset
    name_len = int.from_bytes(raw[offset + 26 : offset + 28], "little")
    extra_len = int.from_bytes(raw[offset + 28 : offset + 30], "little")
    raw[offset + 30 + name_len + extra_len + 40] ^= 0xFF
    zip_path.write_bytes(bytes(raw))

  return mutate


BROKEN_ZIPS = [
    (
        "missing_mask_in_zip",
        _drop_members("masks/b2e1.png"),
        ["train.csv id 'b2e1' has no train.zip:masks/b2e1.png"],
    ),
    (
        "extra_image_in_zip",
        _set_member("images/zz99.png", b"x"),
        ["train.zip:images/zz99.png has no row in train.csv"],
    ),
    (
        "truncated_png_in_zip",
        _truncate_member("images/a1f0.png"),
        ["train.zip:images/a1f0.png", "truncated"],
    ),
    (
        "not_a_png_in_zip",
        _set_member("masks/c3d2.png", b"hello"),
        ["train.zip:masks/c3d2.png", "not a decodable image"],
    ),
    (
        "bad_crc_in_zip",
        _corrupt_member_data("images/d4c3.png"),
        ["train.zip:images/d4c3.png", "cannot be read", "CRC"],
    ),
    (
        "not_a_zip",
        lambda root: (root / "train.zip").write_bytes(b"hello"),
        ["train.zip is not a readable zip file"],
    ),
    (
        "zip_without_masks",
        _drop_members("masks/"),
        ["train.zip should hold images/ and masks/", "has only images/"],
    ),
    (
        "two_copies_in_zip",
        _second_copy_nested,
        ["train.zip holds images/ and masks/ in more than one folder", "'(top)', 'train/'"],
    ),
]


@pytest.mark.parametrize(
    "mutate,expected", [b[1:] for b in BROKEN_ZIPS], ids=[b[0] for b in BROKEN_ZIPS]
)
def test_problems_inside_a_zip_name_the_member(tmp_path, mutate, expected):
  root = _make_valid(tmp_path)
  _zip_part(root, "train")
  mutate(root)
  problems = layout.validate_layout(root)
  assert problems, "validate_layout found nothing wrong"
  with pytest.raises(layout.DataError) as info:
    layout.read_layout(root)
  message = str(info.value)
  for text in expected:
    assert text in message, f"{text!r} not in:\n{message}"
  assert info.value.problems == problems

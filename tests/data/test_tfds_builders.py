"""Tests for saltjax.data.tfds_builders: the tgs_salt builder and load()."""

import os
import pathlib
import shutil
import tempfile
import zipfile

import cv2
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from saltjax.data import layout
from saltjax import metrics
from saltjax.data import rle
from saltjax.data import tfds_builders

SIZE = layout.IMAGE_SIZE
# Neither list is sorted, so that a result in file-name order would show.
TRAIN_IDS = ["f00d", "0a1b", "c3d2", "9e9e"]
TEST_IDS = ["t2", "t1", "t3"]
DEPTHS = {"f00d": 120, "0a1b": 345, "c3d2": 7, "9e9e": 959, "t1": 501, "t2": 502, "t3": 503}


def _image(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE), np.uint8)


def _masks() -> dict[str, np.ndarray]:
  """A block, an empty mask, a stripe and an almost full one."""
  masks = {i: np.zeros((SIZE, SIZE), np.uint8) for i in TRAIN_IDS}
  masks["f00d"][10:40, 20:60] = 1
  masks["c3d2"][:, 50:53] = 1
  masks["9e9e"][1:, :] = 1
  return masks


def _write_csv(path: pathlib.Path, header: str, rows) -> None:
  path.write_text("\n".join([header] + [f"{a},{b}" for a, b in rows]) + "\n")


def write_masks(root: pathlib.Path, masks: dict[str, np.ndarray]) -> None:
  """Writes the mask PNGs and the train.csv that agrees with them."""
  for id_, mask in masks.items():
    cv2.imwrite(str(root / "train/masks" / f"{id_}.png"), mask * 255)
  _write_csv(root / "train.csv", "id,rle_mask", [(i, rle.encode(masks[i])) for i in TRAIN_IDS])


def write_layout(root: pathlib.Path, test: bool = True) -> pathlib.Path:
  """A tiny, valid Kaggle layout (unpacked); returns root."""
  parts = ["train/images", "train/masks"] + (["test/images"] if test else [])
  for sub in parts:
    (root / sub).mkdir(parents=True)
  for n, id_ in enumerate(TRAIN_IDS):
    cv2.imwrite(str(root / "train/images" / f"{id_}.png"), _image(n))
  write_masks(root, _masks())
  _write_csv(root / "depths.csv", "id,z", sorted(DEPTHS.items()))
  if test:
    for n, id_ in enumerate(TEST_IDS):
      cv2.imwrite(str(root / "test/images" / f"{id_}.png"), _image(100 + n))
    _write_csv(root / "sample_submission.csv", "id,rle_mask", [(i, "1 1") for i in TEST_IDS])
  return root


def zip_layout(root: pathlib.Path) -> pathlib.Path:
  """Replaces train/ and test/ by train.zip and test.zip, as Kaggle serves."""
  for part in ("train", "test"):
    with zipfile.ZipFile(root / f"{part}.zip", "w") as archive:
      for png in sorted((root / part).glob("*/*.png")):
        archive.write(png, f"{png.parent.name}/{png.name}")
    shutil.rmtree(root / part)
  return root


def make_config(tmp_path: pathlib.Path, data_dir="") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          data_dir=str(data_dir),
          cache_dir=str(tmp_path / "cache"),
          synthetic=dict(num_train=3, num_test=2, seed=0),
      )
  )


def assert_same_data(got: layout.SaltData, want: layout.SaltData) -> None:
  assert got.train_ids == want.train_ids
  assert got.test_ids == want.test_ids
  assert all(type(i) is str for i in got.train_ids + got.test_ids)
  for field in ("train_images", "train_masks", "train_depths", "test_images", "test_depths"):
    a, b = getattr(got, field), getattr(want, field)
    assert a.dtype == b.dtype and a.shape == b.shape, field
    np.testing.assert_array_equal(a, b, err_msg=field)


def read_splits(builder) -> dict[str, dict[str, np.ndarray]]:
  return {
      split: tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
      for split in builder.info.splits
  }


@pytest.fixture
def generated(monkeypatch):
  """Records the ids of every split the builder generates examples for."""
  calls = []
  original = tfds_builders.TgsSalt._generate_examples

  def spy(self, ids, **kwargs):
    calls.append(list(ids))
    return original(self, ids=ids, **kwargs)

  monkeypatch.setattr(tfds_builders.TgsSalt, "_generate_examples", spy)
  return calls


# ---------------------------------------------------------------------------
# The builder, through TFDS's own test case, on dummy data made at test time.


class _DummyData:
  """Makes the dummy (manual-download) data in a temporary directory."""

  @classmethod
  def make_dummy_data(cls, root: pathlib.Path) -> pathlib.Path:
    return write_layout(root)

  @classmethod
  def setUpClass(cls):
    cls._tmp = tempfile.mkdtemp()
    # Read by DatasetBuilderTestCase.dummy_data as the manual directory.
    cls.EXAMPLE_DIR = str(cls.make_dummy_data(pathlib.Path(cls._tmp) / "d"))
    super().setUpClass()

  @classmethod
  def tearDownClass(cls):
    super().tearDownClass()
    shutil.rmtree(cls._tmp, ignore_errors=True)


class TgsSaltKaggleTest(_DummyData, tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = tfds_builders.TgsSalt
  BUILDER_CONFIG_NAMES_TO_TEST = ["kaggle"]
  SPLITS = {"train": len(TRAIN_IDS), "test": len(TEST_IDS)}
  SKIP_CHECKSUMS = True


class TgsSaltKaggleZipTest(TgsSaltKaggleTest):

  @classmethod
  def make_dummy_data(cls, root):
    return zip_layout(write_layout(root))


class TgsSaltKaggleTrainTest(_DummyData, tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = tfds_builders.TgsSalt
  BUILDER_CONFIG_NAMES_TO_TEST = ["kaggle_train"]
  SPLITS = {"train": len(TRAIN_IDS)}
  SKIP_CHECKSUMS = True

  @classmethod
  def make_dummy_data(cls, root):
    return write_layout(root, test=False)  # No test images are needed.


class TgsSaltSyntheticTest(_DummyData, tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = tfds_builders.TgsSalt
  BUILDER_CONFIG_NAMES_TO_TEST = [tfds_builders.synthetic_config(3, 2, 0)]
  SPLITS = {"train": 3, "test": 2}
  SKIP_CHECKSUMS = True

  @classmethod
  def make_dummy_data(cls, root):
    # Serves as the download directory, where the layout is generated.
    root.mkdir()
    return root


def test_examples_hold_what_layout_reads(tmp_path):
  source = write_layout(tmp_path / "kaggle")
  builder = tfds_builders.TgsSalt(data_dir=tmp_path / "tfds")
  assert builder.builder_config.name == "kaggle"
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=source))
  splits = read_splits(builder)
  want = layout.read_layout(source)
  train, test = splits["train"], splits["test"]
  assert [i.decode() for i in train["id"]] == TRAIN_IDS
  assert train["image"].shape == (4, SIZE, SIZE, 1)
  np.testing.assert_array_equal(train["image"][..., 0], want.train_images)
  np.testing.assert_array_equal(train["mask"][..., 0], want.train_masks)
  assert train["depth"].dtype == np.int32
  assert train["depth"].tolist() == [DEPTHS[i] for i in TRAIN_IDS]
  assert train["coverage_class"].tolist() == (metrics.coverage_class(want.train_masks).tolist())
  assert train["coverage_class"].tolist() == [2, 0, 1, 10]
  assert [i.decode() for i in test["id"]] == TEST_IDS
  np.testing.assert_array_equal(test["image"][..., 0], want.test_images)
  assert not test["mask"].any()
  assert test["coverage_class"].tolist() == [-1, -1, -1]
  assert test["depth"].tolist() == [DEPTHS[i] for i in TEST_IDS]


def test_builder_reads_zips_like_unpacked_folders(tmp_path):
  unpacked = write_layout(tmp_path / "unpacked")
  zipped = zip_layout(write_layout(tmp_path / "zipped"))
  results = []
  for source in (unpacked, zipped):
    builder = tfds_builders.TgsSalt(data_dir=tmp_path / f"tfds_{source.name}")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=source))
    results.append(read_splits(builder))
  for split in ("train", "test"):
    for name, value in results[0][split].items():
      np.testing.assert_array_equal(results[1][split][name], value)


def test_synthetic_config_by_name(tmp_path):
  from saltjax.data import synthetic  # pylint: disable=g-import-not-at-top

  name = f"synthetic_v{synthetic.VERSION}_n3_t2_s0"
  builder = tfds.builder(f"tgs_salt/{name}", data_dir=tmp_path)
  assert builder.builder_config is tfds_builders.synthetic_config(3, 2, 0)
  assert builder.builder_config.num_train == 3
  with pytest.raises(ValueError, match="not found"):
    tfds.builder(f"tgs_salt/synthetic_v{synthetic.VERSION + 1}_n3_t2_s0", data_dir=tmp_path)


def test_manual_download_instructions_name_the_files():
  text = tfds_builders.TgsSalt.MANUAL_DOWNLOAD_INSTRUCTIONS
  for name in (
      "train.zip",
      "test.zip",
      "train.csv",
      "depths.csv",
      "sample_submission.csv",
      "kaggle competitions download -c" " tgs-salt-identification-challenge",
  ):
    assert name in text


def test_tensorflow_sees_no_gpu():
  assert tf.config.get_visible_devices("GPU") == []


# ---------------------------------------------------------------------------
# load(): prepare once per source, read back exactly.


@pytest.mark.parametrize("load_test", [True, False])
def test_load_round_trips_exactly(tmp_path, load_test):
  source = write_layout(tmp_path / "kaggle")
  data = tfds_builders.load(make_config(tmp_path, source), source, load_test=load_test)
  assert_same_data(data, layout.read_layout(source, load_test=load_test))


def test_load_reads_zips_like_unpacked_folders(tmp_path):
  unpacked = write_layout(tmp_path / "unpacked")
  zipped = zip_layout(write_layout(tmp_path / "zipped"))
  config = make_config(tmp_path, unpacked)
  assert_same_data(tfds_builders.load(config, zipped), tfds_builders.load(config, unpacked))


def test_load_reuses_and_rebuilds_when_the_source_changes(tmp_path, generated):
  source = write_layout(tmp_path / "kaggle")
  config = make_config(tmp_path, source)
  first = tfds_builders.load(config, source)
  assert generated == [TRAIN_IDS, TEST_IDS]
  target = tfds_builders.tfds_data_dir(config.cache_dir, source)
  assert target.parent == tmp_path / "cache" / "tfds"
  assert target.name.startswith("kaggle-")
  prepared = target / "tgs_salt" / "kaggle" / "1.0.0"
  mtime = prepared.stat().st_mtime_ns

  assert_same_data(tfds_builders.load(config, source), first)
  assert len(generated) == 2  # Nothing was generated again.
  assert prepared.stat().st_mtime_ns == mtime

  masks = _masks()
  masks["0a1b"][50:60, 50:60] = 1  # One mask changes.
  write_masks(source, masks)
  changed = tfds_builders.load(config, source)
  assert len(generated) == 4
  new_target = tfds_builders.tfds_data_dir(config.cache_dir, source)
  assert new_target != target
  assert_same_data(changed, layout.read_layout(source))
  assert changed.train_masks[1].sum() == 100 and first.train_masks[1].sum() == 0


def test_fingerprint_follows_files_and_path(tmp_path):
  source = write_layout(tmp_path / "kaggle")
  fingerprint = tfds_builders.source_fingerprint(source)
  assert tfds_builders.source_fingerprint(str(source)) == fingerprint
  copy = tmp_path / "copy"
  shutil.copytree(source, copy, copy_function=shutil.copy2)
  assert tfds_builders.source_fingerprint(copy) != fingerprint
  changes = [
      lambda: cv2.imwrite(str(source / "test/images/t4.png"), _image(9)),
      lambda: os.remove(source / "test/images/t4.png"),
      lambda: (source / "depths.csv").write_text((source / "depths.csv").read_text() + "t4,1\n"),
      lambda: shutil.copy(source / "train/images/0a1b.png", source / "train/images/f00d.png"),
  ]
  for change in changes:
    change()
    previous, fingerprint = fingerprint, tfds_builders.source_fingerprint(source)
    assert fingerprint != previous


def test_broken_layout_raises_before_anything_is_written(tmp_path):
  source = write_layout(tmp_path / "kaggle")
  os.remove(source / "train/masks/c3d2.png")
  (source / "test/images/t1.png").write_bytes(b"not a png")
  config = make_config(tmp_path, source)
  with pytest.raises(layout.DataError) as info:
    tfds_builders.load(config, source)
  assert "train/masks/c3d2.png" in str(info.value)
  assert "test/images/t1.png" in str(info.value)
  assert not (tmp_path / "cache").exists()


def test_interrupted_preparation_is_not_reused(tmp_path, monkeypatch):
  source = write_layout(tmp_path / "kaggle")
  config = make_config(tmp_path, source)
  original = tfds_builders.TgsSalt._generate_examples

  def crash_midway(self, **kwargs):
    for n, example in enumerate(original(self, **kwargs)):
      if n == 2:
        raise KeyboardInterrupt("killed")
      yield example

  monkeypatch.setattr(tfds_builders.TgsSalt, "_generate_examples", crash_midway)
  with pytest.raises(KeyboardInterrupt):
    tfds_builders.load(config, source)
  variant = tfds_builders.tfds_data_dir(config.cache_dir, source) / "tgs_salt" / "kaggle"
  assert not (variant / "1.0.0").exists()
  monkeypatch.undo()
  assert_same_data(tfds_builders.load(config, source), layout.read_layout(source))
  assert [p.name for p in variant.iterdir()] == ["1.0.0"]


def test_load_without_test_images(tmp_path):
  source = write_layout(tmp_path / "kaggle", test=False)
  config = make_config(tmp_path, source)
  data = tfds_builders.load(config, source, load_test=False)
  assert_same_data(data, layout.read_layout(source, load_test=False))
  target = tfds_builders.tfds_data_dir(config.cache_dir, source)
  assert (target / "tgs_salt" / "kaggle_train" / "1.0.0").is_dir()
  with pytest.raises(layout.DataError, match="test/images"):
    tfds_builders.load(config, source, load_test=True)


def test_load_test_false_reuses_the_full_dataset(tmp_path, generated):
  source = write_layout(tmp_path / "kaggle")
  config = make_config(tmp_path, source)
  tfds_builders.load(config, source, load_test=True)
  data = tfds_builders.load(config, source, load_test=False)
  assert len(generated) == 2  # Train and test, once.
  assert_same_data(data, layout.read_layout(source, load_test=False))


def test_load_uses_the_synthetic_config_for_the_embedded_dataset(tmp_path):
  from saltjax.data import synthetic_dataset  # pylint: disable=g-import-not-at-top

  config = make_config(tmp_path)  # data_dir '' is the embedded dataset.
  source = synthetic_dataset.ensure_dataset(tmp_path / "cache", num_train=3, num_test=2, seed=0)
  data = tfds_builders.load(config, source)
  assert_same_data(data, layout.read_layout(source))
  target = tfds_builders.tfds_data_dir(config.cache_dir, source)
  name = tfds_builders.synthetic_config(3, 2, 0).name
  assert (target / "tgs_salt" / name / "1.0.0").is_dir()
  assert not (target / "tgs_salt" / "kaggle").exists()

"""tensorflow-datasets builders for the TGS Salt data, and `load` through them.

Importing this module registers one builder, `tgs_salt`, with three kinds of
config:

  tgs_salt/kaggle          (default) the Kaggle competition files, put by hand
                           in the manual-download directory; splits train, test
  tgs_salt/kaggle_train    the same files, train split only (no test images
                           needed)
  tgs_salt/synthetic_v<V>_n<N>_t<M>_s<S>
                           the embedded synthetic stand-in (saltjax.data.synthetic,
                           generator version V) with N train and M test
                           examples drawn from seed S; made on the fly by
                           `synthetic_config` or by name, so that every size
                           gets its own directory

Every example has:

  id              Text     the Kaggle id (PNG file stem)
  image           Image    (101, 101, 1) uint8
  mask            Image    (101, 101, 1) uint8 in {0, 1}; all zero for test,
                           whose masks are not public
  depth           int32    z from depths.csv
  coverage_class  int32    metrics.coverage_class of the mask (0 empty, i for
                           coverage in ((i-1)/10, i/10]); -1 for test, where
                           the coverage is unknown.  A plain integer rather
                           than a ClassLabel, which cannot hold "unknown".

Examples are written in train.csv order and test-id order (see
layout.read_layout) and read back in that order (`disable_shuffling`).
Generation reads through layout.read_layout, so a data directory with problems
fails with a layout.DataError listing all of them, and zipped or unpacked
Kaggle files both work.

`load(config, data_dir)` is how the training code reads through these builders:
it prepares the dataset once into a directory named after a fingerprint of
data_dir and reads it back into a layout.SaltData.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import importlib.resources
import importlib.resources.abc
import importlib.util
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import time

# tensorflow-datasets 4.9.10 imports the `importlib_resources` backport (for
# `importlib_resources.abc.Traversable`, when it looks up a builder's code
# path) without declaring it as a dependency (tensorflow/datasets#11212).
# Where the backport is not installed, the standard library's identical API
# stands in, so that preparing a dataset does not fail with ModuleNotFoundError.
if importlib.util.find_spec("importlib_resources") is None:
  sys.modules["importlib_resources"] = importlib.resources

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from saltjax.host_tensorflow import tf  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-position

from saltjax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from saltjax.data import layout  # pylint: disable=g-import-not-at-top,wrong-import-position
from saltjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from saltjax import metrics  # pylint: disable=g-import-not-at-top,wrong-import-position

IMAGE_SHAPE = (layout.IMAGE_SIZE, layout.IMAGE_SIZE, 1)

# The coverage class of the test examples, whose masks are not public.
UNKNOWN_COVERAGE_CLASS = -1

KAGGLE_COMPETITION = "tgs-salt-identification-challenge"
_HOMEPAGE = f"https://www.kaggle.com/c/{KAGGLE_COMPETITION}"

# Bump whenever `load` would store different data for the same source (for
# instance when layout.read_layout starts reading something differently), so
# that datasets prepared by older code are never served.
_CACHE_VERSION = 1

_SYNTHETIC_NAME = re.compile(r"synthetic_v(\d+)_n(\d+)_t(\d+)_s(\d+)")


@dataclasses.dataclass(eq=False)
class TgsSaltConfig(tfds.core.BuilderConfig):
  """Where a tgs_salt config's examples come from.

  Attributes:
    source: 'kaggle' (the manual-download directory) or 'synthetic'.
    with_test: whether there is a test split (and test images are needed).
    num_train: synthetic only: number of training examples.
    num_test: synthetic only: number of test examples.
    seed: synthetic only: the generator's seed.
  """

  source: str = "kaggle"
  with_test: bool = True
  num_train: int = 0
  num_test: int = 0
  seed: int = 0


KAGGLE = TgsSaltConfig(
    name="kaggle", description="The Kaggle competition files (train and test splits)."
)
KAGGLE_TRAIN = TgsSaltConfig(
    name="kaggle_train",
    with_test=False,
    description="The Kaggle competition files, train split only.",
)


def synthetic_config(num_train: int, num_test: int, seed: int) -> TgsSaltConfig:
  """The config of the embedded synthetic dataset of this size and seed."""
  from saltjax.data import synthetic  # pylint: disable=g-import-not-at-top

  return _synthetic_config(synthetic.VERSION, int(num_train), int(num_test), int(seed))


# Memoised: TFDS refuses a config object that is not the very one its class
# looks up under the same name (see TgsSalt.get_builder_config).
@functools.lru_cache(maxsize=None)
def _synthetic_config(version: int, num_train: int, num_test: int, seed: int) -> TgsSaltConfig:
  return TgsSaltConfig(
      name=f"synthetic_v{version}_n{num_train}_t{num_test}_s{seed}",
      description=(
          f"Embedded synthetic stand-in (generator v{version}):"
          f" {num_train} train and {num_test} test examples, seed"
          f" {seed}."
      ),
      source="synthetic",
      num_train=num_train,
      num_test=num_test,
      seed=seed,
  )


class TgsSalt(tfds.core.GeneratorBasedBuilder):
  """TGS Salt Identification: 101x101 seismic images with salt masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [KAGGLE, KAGGLE_TRAIN]
  DEFAULT_BUILDER_CONFIG_NAME = KAGGLE.name

  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  The competition data cannot be downloaded without a Kaggle account that has
  accepted the competition rules at {_HOMEPAGE}/rules.
  From {_HOMEPAGE}/data download

    train.zip  test.zip  train.csv  depths.csv  sample_submission.csv

  for instance with the Kaggle API (`pip install kaggle`, token in
  ~/.kaggle/kaggle.json):

    kaggle competitions download -c {KAGGLE_COMPETITION}
    unzip {KAGGLE_COMPETITION}.zip -d <manual_dir>

  and put the five files directly in the manual directory (by default
  ~/tensorflow_datasets/downloads/manual/, or the directory passed as
  `tfds.download.DownloadConfig(manual_dir=...)` or `--manual_dir`).  The two
  zips can stay zipped; unpacked (train/images, train/masks, test/images) works
  as well.  The kaggle_train config needs no test images.
  """

  # Set by `load` to the SaltData it has just validated and read, so that
  # generation does not decode every PNG a second time.
  _source_data: layout.SaltData | None = None

  @classmethod
  def get_builder_config(cls, name, version=None):
    """Also knows every synthetic_v<V>_n<N>_t<M>_s<S> of the current V."""
    config = super().get_builder_config(name, version)
    if config is not None:
      return config
    match = _SYNTHETIC_NAME.fullmatch(name)
    if match is None:
      return None
    from saltjax.data import synthetic  # pylint: disable=g-import-not-at-top

    numbers = [int(g) for g in match.groups()]
    # Another generator version would make other data under this name.
    if numbers[0] != synthetic.VERSION:
      return None
    return _synthetic_config(*numbers)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Seismic images (101x101 gray) with masks of salt, from the TGS"
            " Salt Identification Challenge on Kaggle, or a synthetic"
            " stand-in.  Test examples have all-zero masks and coverage_class"
            f" {UNKNOWN_COVERAGE_CLASS}."
        ),
        features=tfds.features.FeaturesDict(
            {
                "id": tfds.features.Text(),
                "image": tfds.features.Image(shape=IMAGE_SHAPE, dtype=np.uint8),
                "mask": tfds.features.Image(shape=IMAGE_SHAPE, dtype=np.uint8),
                "depth": tfds.features.Scalar(dtype=np.int32, doc="z from depths.csv"),
                "coverage_class": tfds.features.Scalar(
                    dtype=np.int32,
                    doc=(
                        "0: empty mask; i: coverage in ((i-1)/10, i/10];"
                        f" {UNKNOWN_COVERAGE_CLASS}: unknown (test)"
                    ),
                ),
            }
        ),
        supervised_keys=("image", "mask"),
        homepage=_HOMEPAGE,
        # Keeps train.csv / test-id order from writing to reading.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    data = self._source_data
    if data is None:
      if config.source == "synthetic":
        from saltjax.data import synthetic_dataset  # pylint: disable=g-import-not-at-top
        # Generated (once) into the download directory, then read like the
        # Kaggle files.
        source_dir = synthetic_dataset.ensure_dataset(
            dl_manager.download_dir,
            num_train=config.num_train,
            num_test=config.num_test,
            seed=config.seed,
        )
      else:
        source_dir = dl_manager.manual_dir
      # Every problem is raised here, before any example is written.
      data = layout.read_layout(source_dir, load_test=config.with_test)
    splits = {
        "train": self._generate_examples(
            ids=data.train_ids,
            images=data.train_images,
            masks=data.train_masks,
            depths=data.train_depths,
        ),
    }
    if config.with_test:
      splits["test"] = self._generate_examples(
          ids=data.test_ids, images=data.test_images, masks=None, depths=data.test_depths
      )
    return splits

  def _generate_examples(self, ids, images, masks, depths):
    """Yields (id, example) in the given order; masks=None for test."""
    if masks is None:
      classes = np.full(len(ids), UNKNOWN_COVERAGE_CLASS, np.int32)
      empty = np.zeros(IMAGE_SHAPE, np.uint8)
    else:
      classes = metrics.coverage_class(masks).astype(np.int32)
    for i, id_ in enumerate(ids):
      yield id_, {
          "id": id_,
          "image": images[i][:, :, None],
          "mask": empty if masks is None else masks[i][:, :, None],
          "depth": np.int32(depths[i]),
          "coverage_class": classes[i],
      }


# ---------------------------------------------------------------------------
# Reading through the builder, with a cache keyed by the source directory.


def _stat_key(stat: os.stat_result) -> list[int]:
  # ctime as well as mtime: tools that restore mtimes (unzip, cp -p, rsync -t)
  # cannot restore ctime, so a file replaced by another with the same size and
  # mtime still changes the fingerprint.
  return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def source_fingerprint(data_dir) -> str:
  """A short hash of where data_dir is and what its files look like on disk.

  It covers the absolute (symlink-resolved) path, the size, mtime and ctime of
  the CSV files and zips, and the same for every entry of train/images,
  train/masks and test/images: any edit, addition or removal changes it, while
  nothing is read or decoded, so a cache hit costs one directory listing.

  Args:
    data_dir: a directory in the Kaggle layout (need not exist).

  Returns:
    16 hex digits.
  """
  root = os.path.realpath(os.path.expanduser(os.fspath(data_dir)))
  parts: list = [["cache", _CACHE_VERSION, str(TgsSalt.VERSION)], ["dir", root]]
  for name in ("train.csv", "depths.csv", "sample_submission.csv", "train.zip", "test.zip"):
    try:
      parts.append([name] + _stat_key(os.stat(os.path.join(root, name))))
    except OSError:
      parts.append([name, None])
  for sub in ("train/images", "train/masks", "test/images"):
    try:
      with os.scandir(os.path.join(root, sub)) as entries:
        listing = sorted([e.name] + _stat_key(e.stat()) for e in entries)
    except OSError:
      listing = None
    parts.append([sub, listing])
  text = json.dumps(parts, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def tfds_data_dir(cache_dir, data_dir) -> pathlib.Path:
  """Where `load` prepares the dataset of data_dir: cache_dir/tfds/<name>."""
  data_dir = pathlib.Path(os.path.expanduser(os.fspath(data_dir)))
  # The directory name is for people looking at the cache; the fingerprint
  # alone decides what is reused.
  readable = re.sub(r"[^A-Za-z0-9._-]+", "_", data_dir.resolve().name)[:60] or "data"
  cache_dir = pathlib.Path(os.path.expanduser(os.fspath(cache_dir)))
  return cache_dir / "tfds" / f"{readable}-{source_fingerprint(data_dir)}"


def _synthetic_config_of(
    config, data_dir: pathlib.Path, cache_dir: pathlib.Path
) -> TgsSaltConfig | None:
  """The synthetic config when data_dir is the embedded dataset, else None."""
  # data.resolve_data_dir gives the embedded dataset exactly when
  # config.data_dir is ''; a data_dir that is not the one it would generate is
  # read as the Kaggle files it holds.
  if getattr(config, "data_dir", ""):
    return None
  from saltjax.data import synthetic_dataset  # pylint: disable=g-import-not-at-top

  sizes = config.synthetic
  expected = cache_dir / synthetic_dataset.dataset_name(sizes.num_train, sizes.num_test, sizes.seed)
  if data_dir.resolve() != expected.resolve():
    return None
  return synthetic_config(sizes.num_train, sizes.num_test, sizes.seed)


def _is_prepared(builder: TgsSalt) -> bool:
  # The test download_and_prepare itself uses to reuse a dataset: TFDS only
  # ever renames a complete directory into place.  (builder.is_prepared()
  # would log a warning for every directory that does not exist yet.)
  return builder.data_path.exists()


def _read_split(builder: TgsSalt, split: str):
  """(ids, images, masks, depths) of a split, in the order written."""
  if builder.info.splits[split].num_examples == 0:
    empty = np.zeros((0,) + IMAGE_SHAPE[:2], np.uint8)
    return [], empty, empty, np.zeros((0,), np.int64)
  batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  ids = [bytes(i).decode("utf-8") for i in batch["id"]]
  return (ids, batch["image"][..., 0], batch["mask"][..., 0], batch["depth"].astype(np.int64))


def _read_back(builder: TgsSalt, load_test: bool) -> layout.SaltData:
  train_ids, train_images, train_masks, train_depths = _read_split(builder, "train")
  if load_test:
    test_ids, test_images, _, test_depths = _read_split(builder, "test")
  else:
    test_ids, test_depths = [], np.zeros((0,), np.int64)
    test_images = np.zeros((0,) + IMAGE_SHAPE[:2], np.uint8)
  return layout.SaltData(
      train_ids=train_ids,
      train_images=train_images,
      train_masks=train_masks,
      train_depths=train_depths,
      test_ids=test_ids,
      test_images=test_images,
      test_depths=test_depths,
  )


def load(config, data_dir, load_test: bool = True) -> layout.SaltData:
  """Reads data_dir through the tgs_salt builder, preparing it on first use.

  The prepared dataset lives in `tfds_data_dir(config.cache_dir, data_dir)`,
  whose name holds `source_fingerprint(data_dir)`: a later call with an
  unchanged data_dir reuses it without decoding anything, and a changed or
  different data_dir gets a directory of its own, never a stale one.  TFDS
  writes into a temporary directory and renames it into place when complete,
  so a crash leaves no half-prepared dataset to be reused.

  Args:
    config: the run config; uses cache_dir, and data_dir and synthetic to
      recognise the embedded synthetic dataset.
    data_dir: the Kaggle-layout directory to read (zipped or unpacked), as
      resolved by data.resolve_data_dir.
    load_test: also read the test split; when False, the test fields are empty
      and no test images are needed.

  Returns:
    The same SaltData as layout.read_layout(data_dir, load_test) gives.

  Raises:
    layout.DataError: data_dir has problems (raised before anything is
      written under the cache), or changed while it was being read.
  """
  tfds.disable_progress_bar()
  data_dir = pathlib.Path(os.path.expanduser(os.fspath(data_dir)))
  cache_dir = pathlib.Path(os.path.expanduser(os.fspath(config.cache_dir)))
  embedded = _synthetic_config_of(config, data_dir, cache_dir)
  if embedded is not None:
    candidates = [embedded]  # Always has test images; no train-only variant.
  elif load_test:
    candidates = [KAGGLE]
  else:
    # A full dataset prepared earlier serves the train split as well; failing
    # that, prepare the train split alone, which needs no test images.
    candidates = [KAGGLE, KAGGLE_TRAIN]

  target = tfds_data_dir(cache_dir, data_dir)
  for builder_config in candidates:
    builder = TgsSalt(data_dir=target, config=builder_config)
    if _is_prepared(builder):
      logging.info("Reading prepared %s from %s", builder.info.full_name, target)
      return _read_back(builder, load_test)

  builder_config = candidates[-1]
  # Validate and decode everything before TFDS writes anything.
  data = layout.read_layout(data_dir, load_test=builder_config.with_test)
  if tfds_data_dir(cache_dir, data_dir) != target:
    raise layout.DataError(
        f"data_dir {data_dir} changed while it was being read; run again once" " it is complete"
    )

  builder = TgsSalt(data_dir=target, config=builder_config)
  builder._source_data = data  # pylint: disable=protected-access
  logging.info("Preparing %s from %s into %s", builder.info.full_name, data_dir, target)
  _remove_abandoned_preparations(target)
  try:
    builder.download_and_prepare(
        download_dir=cache_dir / "tfds" / "downloads",
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(data_dir), compute_stats=tfds.download.ComputeStatsMode.SKIP
        ),
    )
  except OSError as e:
    # Another process preparing the same source renamed its copy into place
    # first; ours is discarded and theirs is as good.
    if not _is_prepared(TgsSalt(data_dir=target, config=builder_config)):
      _remove_abandoned_preparations(target, min_age_seconds=0)
      if e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM):
        raise errors.WorkdirError(
            workdir_lib.describe_os_error(e, cache_dir).replace("--workdir", "--config.cache_dir")
        ) from e
      raise
  finally:
    builder._source_data = None  # pylint: disable=protected-access
  _forget_older_copies(cache_dir, data_dir, target)
  return _read_back(TgsSalt(data_dir=target, config=builder_config), load_test)


# A preparation that has not been touched for this long was abandoned (its
# process was killed): TFDS never cleans up after one.
_ABANDONED_AFTER_SECONDS = 3600
_SOURCE_FILE = "source.txt"


def _remove_abandoned_preparations(
    target: pathlib.Path, min_age_seconds: float = _ABANDONED_AFTER_SECONDS
) -> None:
  """Deletes TFDS's `incomplete.*` directories under `target` that are old enough."""
  now = time.time()
  for path in target.rglob("incomplete.*") if target.is_dir() else []:
    try:
      if path.is_dir() and now - path.stat().st_mtime >= min_age_seconds:
        shutil.rmtree(path, ignore_errors=True)
    except OSError:
      pass


def _forget_older_copies(
    cache_dir: pathlib.Path, data_dir: pathlib.Path, target: pathlib.Path
) -> None:
  """Keeps one prepared copy per source directory: older fingerprints are stale.

  Each changed data directory gets a new prepared copy (its fingerprint
  changed); the copies of its earlier contents can never be read again.
  """
  source = os.fspath(data_dir.resolve())
  try:
    (target / _SOURCE_FILE).write_text(source)
  except OSError:
    return
  for other in (cache_dir / "tfds").iterdir():
    if other == target or not other.is_dir():
      continue
    try:
      if (other / _SOURCE_FILE).read_text() == source:
        logging.info("Removing %s: a copy of an earlier state of %s", other, source)
        shutil.rmtree(other, ignore_errors=True)
    except OSError:
      continue

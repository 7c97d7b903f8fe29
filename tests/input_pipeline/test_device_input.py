"""The on-device input pipeline (saltjax/input_pipeline/on_device.py) against independent truth.

- 101 -> image_size equals the tf.data pipeline's `to_model_size` (TensorFlow
  itself is the reference), as do the inference batches;
- each augmentation op is checked against what it must be: exact flips, a
  shift that is a crop of the reflect-padded image, a zoom equal to
  TensorFlow's resize-then-crop, the brightness and contrast formulas;
- an epoch is a pure function of (seed, fold, epoch): the same batch on a
  rebuild, a permutation of the fold's training rows, another order next epoch;
- importing it (and the config checks, and inference) loads no TensorFlow.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from saltjax.input_pipeline import augment_spec
from saltjax.input_pipeline import on_device
from tests.conftest import run_python

HEAVY = "hflip|vflip|shift(8)|scale(0.1)|brightness(0.1)|contrast(0.1)"


def _image(seed=0, n=None):
  """Distinct-valued float32 image(s) in [0, 1] (so crops are unambiguous)."""
  rng = np.random.default_rng(seed)
  shape = (101, 101) if n is None else (n, 101, 101)
  return rng.uniform(size=shape).astype(np.float32)


def _mask(seed=0):
  rng = np.random.default_rng(seed + 100)
  yy, xx = np.mgrid[:101, :101]
  cy, cx, r = rng.uniform(20, 80), rng.uniform(20, 80), rng.uniform(10, 30)
  return (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2).astype(np.float32)


def _run_op(op, image, mask, num_keys):
  """The op under `num_keys` different keys, vmapped and jitted once."""
  keys = jax.random.split(jax.random.key(7), num_keys)
  images, masks = jax.jit(jax.vmap(op, in_axes=(None, None, 0)))(image, mask, keys)
  return np.asarray(images), np.asarray(masks)


# ------------------------------------------------------------ TF-free import ---


def test_importing_loads_no_tensorflow():
  code = (
      "import sys\n"
      "import saltjax.input_pipeline.on_device, saltjax.input_pipeline.augment_spec, saltjax.model.tta,"
      " saltjax.app.config_checks\n"
      "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow')\n"
      "assert not loaded, loaded\n"
  )
  proc = run_python(["-c", code], timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]


# ------------------------------------------------------------ sizes vs TF ---


@pytest.mark.parametrize("mode,size", [("resize", 128), ("resize", 64), ("pad", 128), ("pad", 160)])
def test_to_model_size_equals_tf_pipeline(mode, size):
  from saltjax.input_pipeline import tfdata

  x = _image(1, n=3)[..., None]
  expected = tfdata.to_model_size(x, size, mode).numpy()
  device_out = np.asarray(jax.jit(lambda v: on_device.to_model_size(v, size, mode))(x))
  on_host = on_device.to_model_size_numpy(x, size, mode)
  assert device_out.shape == on_host.shape == (3, size, size, 1)
  np.testing.assert_allclose(device_out, expected, rtol=0, atol=1e-5)
  np.testing.assert_allclose(on_host, expected, rtol=0, atol=1e-5)
  # A single (H, W, C) image too, as TF's function accepts.
  np.testing.assert_allclose(
      on_device.to_model_size(x[0], size, mode), expected[0], rtol=0, atol=1e-5
  )


def test_pad_split_and_reflection_by_hand():
  assert on_device.pad_widths(128) == (13, 14)
  x = _image(2)[..., None]
  padded = np.asarray(on_device.to_model_size(x, 128, "pad"))[..., 0]
  np.testing.assert_array_equal(padded[13:114, 13:114], x[..., 0])
  # Reflection without repeating the edge: row 12 is row 1, row 114 is row 99.
  np.testing.assert_array_equal(padded[12, 13:114], x[1, :, 0])
  np.testing.assert_array_equal(padded[114, 13:114], x[99, :, 0])
  np.testing.assert_array_equal(padded[13:114, 0], x[:, 13, 0])
  # And back: the inverse crops exactly.
  np.testing.assert_array_equal(on_device.to_original_size(padded[None], "pad")[0], x[..., 0])


# --------------------------------------------------------------- the ops ---


def test_every_named_op_has_a_jax_and_a_tf_version():
  from saltjax.input_pipeline import tfdata_augment

  assert set(on_device._REGISTRY) == set(augment_spec.OPS) == set(tfdata_augment._REGISTRY)


@pytest.mark.parametrize(
    "name,flip", [("hflip", lambda x: x[:, ::-1]), ("vflip", lambda x: x[::-1])]
)
def test_flips_are_exact(name, flip):
  image, mask = _image(4), _mask(4)
  op = on_device.parse(f"{name}(1.0)")[0]
  out_image, out_mask = _run_op(op, image, mask, 3)
  np.testing.assert_array_equal(out_image, np.broadcast_to(flip(image), out_image.shape))
  np.testing.assert_array_equal(out_mask, np.broadcast_to(flip(mask), out_mask.shape))
  out_image, out_mask = _run_op(on_device.parse(f"{name}(0)")[0], image, mask, 3)
  np.testing.assert_array_equal(out_image, np.broadcast_to(image, out_image.shape))
  # p = 0.5: each draw flips image and mask together, or neither.
  out_image, out_mask = _run_op(on_device.parse(name)[0], image, mask, 64)
  flipped = [np.array_equal(i, flip(image)) for i in out_image]
  for i, m, f in zip(out_image, out_mask, flipped):
    assert np.array_equal(i, flip(image) if f else image)
    assert np.array_equal(m, flip(mask) if f else mask)
  assert 16 < sum(flipped) < 48


def test_shift_is_a_crop_of_the_reflect_padded_image():
  pixels = 2
  image, mask = _image(5), _mask(5)
  padded_image = np.pad(image, pixels, mode="reflect")
  padded_mask = np.pad(mask, pixels, mode="reflect")
  out_image, out_mask = _run_op(on_device.parse(f"shift({pixels})")[0], image, mask, 100)
  seen = set()
  for i, m in zip(out_image, out_mask):
    found = [
        (dy, dx)
        for dy in range(2 * pixels + 1)
        for dx in range(2 * pixels + 1)
        if np.array_equal(i, padded_image[dy : dy + 101, dx : dx + 101])
    ]
    assert len(found) == 1, "the shifted image is no crop of the padded one"
    dy, dx = found[0]
    np.testing.assert_array_equal(m, padded_mask[dy : dy + 101, dx : dx + 101])
    seen.add(found[0])
  # Offsets uniform on [0, 2 * pixels]^2, as TF's random crop: all 25 occur.
  assert len(seen) == (2 * pixels + 1) ** 2


def test_scale_is_tf_resize_then_crop():
  import tensorflow as tf

  image, mask = _image(6), _mask(6)
  # TF's scale op for each possible size: resize (image bilinear, mask
  # nearest), then any crop.
  resized = {
      size: (
          tf.image.resize(image[..., None], [size, size], "bilinear").numpy()[..., 0],
          tf.image.resize(mask[..., None], [size, size], "nearest").numpy()[..., 0],
      )
      for size in range(101, 112)
  }
  out_image, out_mask = _run_op(on_device.parse("scale(0.1)")[0], image, mask, 24)
  sizes = set()
  for i, m in zip(out_image, out_mask):
    matches = [
        (size, dy, dx)
        for size, (big, _) in resized.items()
        for dy in range(size - 100)
        for dx in range(size - 100)
        if np.allclose(i, big[dy : dy + 101, dx : dx + 101], rtol=0, atol=1e-5)
    ]
    assert matches, "no resize + crop of TF's gives the zoomed image"
    size, dy, dx = matches[0]
    np.testing.assert_array_equal(m, resized[size][1][dy : dy + 101, dx : dx + 101])
    sizes.add(size)
  assert len(sizes) >= 4 and sizes <= set(range(101, 112))
  # Size 101, offset 0 is the identity.
  same_image, same_mask = on_device.zoom_crop(image, mask, (101, 101), (0, 0))
  np.testing.assert_allclose(same_image, image, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(same_mask, mask)


def test_brightness_adds_one_uniform_offset():
  image, mask = _image(7), _mask(7)
  out_image, out_mask = _run_op(on_device.parse("brightness(0.2)")[0], image, mask, 50)
  deltas = (out_image - image).reshape(50, -1)
  np.testing.assert_allclose(
      deltas, np.broadcast_to(deltas[:, :1], deltas.shape), rtol=0, atol=1e-6
  )  # one offset an image
  assert np.all(deltas[:, 0] >= -0.2) and np.all(deltas[:, 0] < 0.2)
  assert deltas[:, 0].min() < -0.1 and deltas[:, 0].max() > 0.1  # spread over the range
  np.testing.assert_array_equal(out_mask, np.broadcast_to(mask, out_mask.shape))


def test_contrast_scales_around_the_mean():
  image, mask = _image(8), _mask(8)
  mean = image.mean(dtype=np.float64)
  out_image, out_mask = _run_op(on_device.parse("contrast(0.3)")[0], image, mask, 50)
  factors = []
  for out in out_image:
    # (x - mean) * f + mean: solve f from the data, then check every pixel.
    f = np.sum((out - mean) * (image - mean)) / np.sum((image - mean) ** 2)
    np.testing.assert_allclose(out, (image - mean) * f + mean, rtol=0, atol=1e-5)
    factors.append(f)
  factors = np.array(factors)
  assert np.all(factors >= 0.7 - 1e-6) and np.all(factors < 1.3 + 1e-6)
  assert factors.min() < 0.85 and factors.max() > 1.15
  np.testing.assert_allclose(out_image.mean(axis=(1, 2)), mean, atol=1e-5)
  np.testing.assert_array_equal(out_mask, np.broadcast_to(mask, out_mask.shape))


def test_augment_spec_fills_defaults():
  ops = augment_spec.parse(" hflip | shift|scale(0.2)|contrast(0.3)|vflip(0.25) ")
  assert [(op.name, op.args) for op in ops] == [
      ("hflip", (0.5,)),
      ("shift", (8,)),
      ("scale", (0.2,)),
      ("contrast", (0.3,)),
      ("vflip", (0.25,)),
  ]
  assert augment_spec.parse("") == [] and augment_spec.parse("hflip()")[0].args == (0.5,)


@pytest.mark.parametrize(
    "spec,fault",
    [
        ("hflip|rotate(5)", "unknown augmentation 'rotate(5)'"),
        ("shift(200)", "pixels=200"),
        ("shift(2.5)", "pixels=2.5"),
        ("contrast(0)", "delta=0"),
        ("hflip(p=1)", "bad arguments"),
        ("hflip|shift(8))", "bad arguments"),
        ("shift(1,2)", "bad arguments"),
        ("scale(-0.9)", "max_scale=-0.9"),
        ("scale(0.1, 2)", "bad arguments"),
        ("brightness('a')", "bad arguments"),
    ],
)
def test_bad_augment_spec_names_the_option(spec, fault):
  with pytest.raises(ValueError, match="config.augment") as e:
    augment_spec.parse(spec)
  assert fault in str(e.value)


def test_config_checks_name_input_pipeline():
  from configs import fold
  from saltjax.app import config_checks

  config = fold.get_config()
  assert config.input_pipeline == "tfdata"
  config.input_pipeline = "device"
  config_checks.check(config)
  config.input_pipeline = "gpu"
  with pytest.raises(config_checks.ConfigError, match="config.input_pipeline='gpu'"):
    config_checks.check(config)


# -------------------------------------------------------- batches, epochs ---

NUM_IMAGES, BATCH = 40, 8


def _config(augment=HEAVY, resize_mode="resize", image_size=64):
  return ml_collections.ConfigDict(
      dict(augment=augment, resize_mode=resize_mode, image_size=image_size, seed=3)
  )


@pytest.fixture(scope="module")
def dataset():
  images = (_image(9, n=NUM_IMAGES) * 255).astype(np.uint8)
  masks = np.stack([_mask(i) for i in range(NUM_IMAGES)]).astype(np.uint8)
  fold_of = np.arange(NUM_IMAGES) % 3  # training sizes 26, 27, 27
  return images, masks, fold_of


def test_epoch_is_a_pure_function_of_seed_fold_and_epoch(dataset):
  images, masks, fold_of = dataset
  config = _config()
  data = on_device.put_on_device(images, masks)
  folds = on_device.fold_indices(fold_of, [0, 1, 2], seed=config.seed)
  steps = on_device.steps_per_epoch(folds, BATCH)
  assert steps == 26 // BATCH
  batch_fn = jax.jit(on_device.make_train_batch_fn(config, BATCH))
  epoch0 = [
      jax.device_get(b) for b in on_device.epoch_batches(batch_fn, data, folds, 0, steps=steps)
  ]
  assert epoch0[0]["image"].shape == (3, BATCH, 64, 64, 1)
  assert epoch0[0]["mask"].shape == (3, BATCH, 64, 64)
  assert epoch0[0]["image"].dtype == epoch0[0]["mask"].dtype == np.float32

  # Rebuilt from scratch (a restart): a new jit, new device arrays, from step 1.
  data2 = on_device.put_on_device(images, masks)
  folds2 = on_device.fold_indices(fold_of, [0, 1, 2], seed=config.seed)
  batch_fn2 = jax.jit(on_device.make_train_batch_fn(config, BATCH))
  resumed = [
      jax.device_get(b)
      for b in on_device.epoch_batches(batch_fn2, data2, folds2, 0, steps=steps, start_step=1)
  ]
  for a, b in zip(epoch0[1:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])

  # One fold alone, built for that fold only, is the same fold of the F-fold batch.
  alone = on_device.fold_indices(fold_of, [2], seed=config.seed)
  b = jax.device_get(batch_fn(data, alone, 0, 1))
  np.testing.assert_array_equal(b["image"][0], epoch0[1]["image"][2])

  # The next epoch is another order (and another augmentation).
  epoch1 = jax.device_get(batch_fn(data, folds, 1, 0))
  assert not np.allclose(epoch1["image"], epoch0[0]["image"])
  # Different folds (different keys and rows) differ.
  assert not np.allclose(epoch0[0]["image"][0], epoch0[0]["image"][1])


def test_epoch_order_is_a_permutation_of_the_fold(dataset):
  _, _, fold_of = dataset
  folds = on_device.fold_indices(fold_of, [0, 1, 2], seed=3)
  orders = {}
  for f in range(3):
    size = int(folds.sizes[f])
    assert size == int((fold_of != f).sum())
    for epoch in (0, 1):
      order = np.asarray(
          on_device.epoch_order(
              folds.rows[f], folds.sizes[f], jax.random.key(folds.seeds[f]), epoch
          )
      )
      # The fold's training rows, each once, none of its validation rows.
      np.testing.assert_array_equal(np.sort(order[:size]), np.flatnonzero(fold_of != f))
      orders[f, epoch] = order[:size]
    assert not np.array_equal(orders[f, 0], orders[f, 1])
  # Extra (pseudo-label) rows join every fold.
  with_extra = on_device.fold_indices(fold_of, [0], seed=3, num_extra=5)
  assert int(with_extra.sizes[0]) == int((fold_of != 0).sum()) + 5
  assert set(range(NUM_IMAGES, NUM_IMAGES + 5)) <= set(np.asarray(with_extra.rows[0]).tolist())


def test_batches_follow_the_epoch_order(dataset):
  images, masks, fold_of = dataset
  # No augmentation and padding: the centre of each batch image is the
  # uint8 image / 255, so the rows a batch holds can be read off.
  config = _config(augment="", resize_mode="pad", image_size=128)
  data = on_device.put_on_device(images, masks)
  folds = on_device.fold_indices(fold_of, [0, 1, 2], seed=config.seed)
  batch_fn = jax.jit(on_device.make_train_batch_fn(config, BATCH))
  for f in range(3):
    order = np.asarray(
        on_device.epoch_order(folds.rows[f], folds.sizes[f], jax.random.key(folds.seeds[f]), 4)
    )
    for step in range(on_device.steps_per_epoch(folds, BATCH)):
      batch = jax.device_get(batch_fn(data, folds, 4, step))
      rows = order[step * BATCH : (step + 1) * BATCH]
      # (XLA divides by 255 as a multiply by 1/255: an ulp apart.)
      np.testing.assert_allclose(
          batch["image"][f, :, 13:114, 13:114, 0],
          images[rows].astype(np.float32) / np.float32(255),
          rtol=0,
          atol=1e-7,
      )
      np.testing.assert_array_equal(batch["mask"][f, :, 13:114, 13:114], masks[rows])


@pytest.mark.parametrize("resize_mode,image_size", [("resize", 128), ("pad", 128)])
def test_masks_stay_binary(dataset, resize_mode, image_size):
  images, masks, fold_of = dataset
  config = _config(resize_mode=resize_mode, image_size=image_size)
  data = on_device.put_on_device(images, masks)
  folds = on_device.fold_indices(fold_of, [0, 1], seed=config.seed)
  batch = jax.device_get(jax.jit(on_device.make_train_batch_fn(config, BATCH))(data, folds, 0, 0))
  assert set(np.unique(batch["mask"])) == {0.0, 1.0}
  assert np.all(np.isfinite(batch["image"]))


def test_put_on_device_refuses_bad_arrays():
  images = np.zeros((4, 101, 101), np.uint8)
  with pytest.raises(ValueError, match="uint8"):
    on_device.put_on_device(images.astype(np.float32), images)
  with pytest.raises(ValueError, match="0 and 1"):
    on_device.put_on_device(images, images + 255)
  with pytest.raises(ValueError, match="do not match"):
    on_device.put_on_device(images, images[:3])
  folds = on_device.fold_indices(np.arange(4) % 2, [0, 1], seed=0)
  with pytest.raises(ValueError, match="config.batch_size=8"):
    on_device.steps_per_epoch(folds, 8)


def test_a_folds_batches_do_not_depend_on_the_folds_trained_with_it():
  """Kaggle size (4,000 ids, 5 folds; pseudo-labels make the folds' training
  sides unequal): each fold's epoch order and batches are the same when it is
  trained alone as in the group of 5, whose table is padded to the largest fold."""
  num_ids, num_folds, batch = 4000, 5, 32
  fold_of = np.arange(num_ids) % num_folds
  extra_counts = {0: 310, 1: 0, 2: 57, 3: 123, 4: 1}  # per-fold pseudo-labels
  extra_rows, start = {}, num_ids
  for fold, count in extra_counts.items():
    extra_rows[fold] = np.arange(start, start + count)
    start += count
  # Row r's image holds r in two pixels (high and low byte), so a batch's rows
  # are read off it; no augmentation, padding to 128 keeps the pixels exact.
  images = np.zeros((start, 101, 101), np.uint8)
  images[:, 0, 0], images[:, 0, 1] = np.arange(start) // 256, np.arange(start) % 256
  masks = (images > 0).astype(np.uint8)
  config = _config(augment="", resize_mode="pad", image_size=128)
  data = on_device.put_on_device(images, masks)
  group = on_device.fold_indices(fold_of, range(num_folds), seed=config.seed, extra_rows=extra_rows)
  assert len(set(np.asarray(group.sizes).tolist())) > 1  # unequal: the table is padded
  batch_fn = jax.jit(on_device.make_train_batch_fn(config, batch))
  steps = on_device.steps_per_epoch(group, batch)
  for fold in range(num_folds):
    alone = on_device.fold_indices(
        fold_of, [fold], seed=config.seed, extra_rows={fold: extra_rows[fold]}
    )
    size = int(alone.sizes[0])
    for epoch in (0, 7):
      order_alone = np.asarray(
          on_device.epoch_order(
              alone.rows[0], alone.sizes[0], jax.random.key(alone.seeds[0]), epoch
          )
      )
      order_group = np.asarray(
          on_device.epoch_order(
              group.rows[fold], group.sizes[fold], jax.random.key(group.seeds[fold]), epoch
          )
      )
      expected = np.concatenate([np.flatnonzero(fold_of != fold), extra_rows[fold]])
      np.testing.assert_array_equal(np.sort(order_alone[:size]), expected)
      np.testing.assert_array_equal(order_group[:size], order_alone[:size], err_msg=f"{fold}")
    for step in (0, steps - 1):
      got_group = jax.device_get(batch_fn(data, group, 3, step))
      got_alone = jax.device_get(batch_fn(data, alone, 3, step))
      for key in ("image", "mask"):
        np.testing.assert_array_equal(got_group[key][fold], got_alone[key][0])
      pixels = np.rint(got_alone["image"][0, :, 13, 13:15, 0] * 255).astype(int)
      rows = pixels[:, 0] * 256 + pixels[:, 1]
      order = np.asarray(
          on_device.epoch_order(alone.rows[0], alone.sizes[0], jax.random.key(alone.seeds[0]), 3)
      )
      np.testing.assert_array_equal(rows, order[step * batch : (step + 1) * batch])

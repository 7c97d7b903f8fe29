"""TTA views: a flipped view is the model on the flipped 101x101 image."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from saltjax.model import tta
from saltjax.input_pipeline import tfdata
from saltjax.model import unet

# Tiny, but with the stride-32 encoder that makes a 1-pixel offset matter.
TINY = dict(
    stage_sizes=(1, 1, 1, 1), encoder_width=4, scse_reduction=4, decoder_channels=(8, 8, 8, 4, 4)
)


def _variables(model, x, seed=0):
  """Random variables with model.init's structure (no per-parameter compiles)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "kernel" in name:
      scale = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.standard_normal(leaf.shape) * scale, leaf.dtype)
    if "scale" in name or "var" in name:
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("resize_mode", ["pad", "resize"])
def test_flip_tta_is_the_model_on_the_flipped_image(resize_mode):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 101, 101), dtype=np.uint8)
  # What the model sees of an image in training (in 'pad' mode: the content
  # at offset 13 of 128), from the tf.data pipeline.
  to_model = lambda x: tfdata.to_model_size(
      tf.constant(x[..., None].astype(np.float32) / 255), 128, resize_mode
  ).numpy()
  np.testing.assert_allclose(
      np.asarray(
          jax.jit(
              lambda x: tta.geometry.to_model_size(
                  x.astype(jnp.float32)[..., None] / 255, 128, resize_mode
              )
          )(images)
      ),
      to_model(images),
      atol=1e-5,
  )
  model = unet.UNet(**TINY)
  variables = _variables(model, jnp.asarray(to_model(images)))
  plain = jax.jit(tta.make_infer_fn(model, 128, resize_mode, "none"))
  with_tta = jax.jit(tta.make_infer_fn(model, 128, resize_mode, "hflip+vflip"))

  # By hand: each flipped 101x101 image through the plain model, its
  # prediction flipped back, and the three predictions averaged.
  views = [np.asarray(plain(variables, images)["probs"])]
  for axis in (2, 1):
    flipped = plain(variables, np.ascontiguousarray(np.flip(images, axis)))["probs"]
    views.append(np.flip(np.asarray(flipped), axis))
    assert np.abs(views[-1] - views[0]).max() > 1e-3  # the views differ
  got = np.asarray(with_tta(variables, images)["probs"])
  assert got.shape == (2, 101, 101)
  # float32 sums in a flipped order: agreement to ~1e-5, where a one-pixel
  # offset of the content costs ~0.1.
  np.testing.assert_allclose(got, np.mean(views, axis=0), rtol=0, atol=3e-5)


def test_predicting_again_with_an_equal_config_traces_the_forward_once():
  # Each prediction (a pseudo-label round, configs/predict.py, a section)
  # builds its model and forward from the config; equal ones share one jitted
  # forward, so the second prediction runs the programs the first traced.
  from saltjax import parallel
  from saltjax.inference import ensemble
  from tests.conftest import step_config

  config = step_config(batch_size=2, image_size=64)
  config.predict.batch_size = 2
  config.predict.tta = "hflip"
  images = np.random.default_rng(0).integers(0, 256, (3, 101, 101), dtype=np.uint8)
  mesh = parallel.create_mesh()
  first = ensemble.jitted_forward(config, unet.create_model(config.model), mesh)
  x = jnp.zeros((1, 64, 64, 1))
  variables = _variables(unet.create_model(config.model), x)
  probs = first(first.place(variables), images)["probs"]
  second = ensemble.jitted_forward(config, unet.create_model(config.model), mesh)
  again = second(second.place(variables), images)["probs"]
  np.testing.assert_array_equal(probs, again)
  assert second.infer_fn is first.infer_fn and first.infer_fn._cache_size() == 1
  config.predict.tta = "none"  # another forward
  assert ensemble.jitted_forward(config, unet.create_model(config.model), mesh).infer_fn is not (
      first.infer_fn
  )

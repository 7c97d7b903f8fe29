"""saltjax.model.space_to_depth: the last decoder block and head on 2x2-packed maps.

Truth from outside the module: the pixel order of a packed map worked out by
hand, convolutions of the full-resolution map by lax (and a numpy nearest
upsample), and the U-Net's own full-resolution block, against which the
packed one must give the same outputs, gradients and BatchNorm statistics
from the same parameters.
"""

import flax
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from saltjax.app import config_checks
from saltjax.model import space_to_depth
from saltjax.model import unet
from configs import quick


def _conv(x, kernel):
  """A full-resolution 3x3 convolution with padding 1 (the decoder's), by lax."""
  return lax.conv_general_dilated(
      x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def test_pack_puts_each_2x2_block_in_the_channels_row_major():
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)  # pixel (r, c) holds 4r + c
  packed = np.asarray(space_to_depth.pack(jnp.asarray(x)))
  assert packed.shape == (1, 2, 2, 4)
  # Packed pixel (0, 1) holds full-resolution pixels (0,2), (0,3), (1,2), (1,3).
  np.testing.assert_array_equal(packed[0, 0, 1], [2, 3, 6, 7])
  np.testing.assert_array_equal(packed[0, 1, 0], [8, 9, 12, 13])
  y = np.random.default_rng(0).standard_normal((2, 6, 10, 3)).astype(np.float32)
  np.testing.assert_array_equal(space_to_depth.unpack(space_to_depth.pack(jnp.asarray(y))), y)


@pytest.mark.parametrize("size", [(8, 8), (6, 10)])
def test_packed_kernel_convolves_packed_maps_as_the_kernel_does_full_maps(size):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, *size, 3)).astype(np.float32)
  kernel = rng.standard_normal((3, 3, 3, 5)).astype(np.float32)
  packed = _conv(space_to_depth.pack(x), space_to_depth.packed_kernel(jnp.asarray(kernel)))
  np.testing.assert_allclose(space_to_depth.unpack(packed), _conv(x, kernel), atol=1e-5)


def test_packed_kernel_of_an_upsampled_input_convolves_the_half_resolution_map():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)
  kernel = rng.standard_normal((3, 3, 3, 2)).astype(np.float32)
  upsampled = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)  # nearest 2x, by numpy
  packed = _conv(x, space_to_depth.packed_kernel(jnp.asarray(kernel), upsampled_input=True))
  assert packed.shape == (2, 5, 4, 8)
  np.testing.assert_allclose(space_to_depth.unpack(packed), _conv(upsampled, kernel), atol=1e-5)


# Tiny but structurally complete (the U-Net tests' TINY).
TINY = dict(
    stage_sizes=(1, 1, 1, 1), encoder_width=4, scse_reduction=4, decoder_channels=(16, 8, 8, 4, 4)
)


def _models(dtype="float32", **overrides):
  config = _model_config(**TINY, **overrides)
  config.final_block = "plain"
  plain = unet.create_model(config, dtype=dtype)
  config.final_block = "space_to_depth"
  return plain, unet.create_model(config, dtype=dtype)


def _variables(model, x):
  """Variables of model.init's structure, filled from numpy (no init kernels to compile)."""
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "kernel" in name:
      return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])))
    low = 0.5 if "scale" in name or "var" in name else -0.2
    return jnp.asarray(rng.uniform(low, low + 1.0, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


class _Final(flax.linen.Module):
  """The last decoder block, plain or packed, under one name: the same parameter paths."""

  packed: bool

  @flax.linen.compact
  def __call__(self, x):
    if self.packed:
      return space_to_depth.DecoderBlock(4, scse_reduction=2, name="decoder_4")(x)
    return unet.DecoderBlock(4, scse_reduction=2, name="decoder_4")(x, None)


def test_the_packed_block_starts_from_the_plain_blocks_initial_values():
  x = jnp.zeros((1, 4, 4, 6))
  plain = _Final(False).init(jax.random.key(0), x)
  packed = _Final(True).init(jax.random.key(0), x)
  assert jax.tree.structure(packed) == jax.tree.structure(plain)
  for a, b in zip(jax.tree.leaves(packed), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "overrides",
    [{"deep_supervision": True, "classifier": True}, {"scse_decoder": False}],
    ids=["with_side_heads", "without_scse"],
)
def test_the_packed_final_block_is_the_plain_one(overrides):
  plain, packed = _models(**overrides)
  assert packed.final_block == "space_to_depth"
  x = jax.random.uniform(jax.random.key(1), (3, 32, 32))
  variables = _variables(plain, x)
  assert jax.tree.structure(_variables(packed, x)) == jax.tree.structure(variables)
  target = jax.random.normal(jax.random.key(2), (3, 32, 32))

  def train(model, params):
    def loss(params):
      out, state = model.apply(
          {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
      )
      side = sum((s * target).sum() for s in out.get("side_logits", []))
      return (out["logits"] * target).sum() + side, (out, state)

    return jax.value_and_grad(loss, has_aux=True)(params)

  (_, (want, want_state)), want_grads = jax.jit(train, static_argnums=0)(plain, variables["params"])
  (_, (got, got_state)), grads = jax.jit(train, static_argnums=0)(packed, variables["params"])
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Sums that cancel to near zero (a bias before BatchNorm) differ by their
  # rounding: absolute tolerance on the scale of the largest gradient.
  scale = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(want_grads))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale)
  # Evaluation reads the running statistics.
  evaluate = jax.jit(lambda model, v: model.apply(v, x)["logits"], static_argnums=0)
  np.testing.assert_allclose(evaluate(packed, variables), evaluate(plain, variables), atol=1e-5)


def test_the_packed_final_block_in_bfloat16_is_the_plain_one_to_bfloat16_rounding():
  plain, packed = _models(dtype="bfloat16")
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32))
  variables = _variables(plain, x)
  evaluate = jax.jit(lambda model, v: model.apply(v, x)["logits"], static_argnums=0)
  want, got = evaluate(plain, variables), evaluate(packed, variables)
  # bfloat16 keeps 8 bits: a few units in the last place of the logits' scale.
  assert float(jnp.abs(got - want).max()) <= 0.05 * float(jnp.abs(want).max())


def _model_config(**overrides):
  config = ml_collections.ConfigDict(quick.get_config().model.to_dict())
  config.update(overrides)
  return config


@pytest.mark.parametrize(
    "platform, overrides, expected",
    [
        ("tpu", {}, "space_to_depth"),
        ("cpu", {}, "plain"),
        ("gpu", {}, "plain"),
        ("tpu", {"upsample": "bilinear"}, "plain"),
        ("tpu", {"hypercolumn": True}, "plain"),
        ("cpu", {"final_block": "space_to_depth"}, "space_to_depth"),
        ("tpu", {"final_block": "plain"}, "plain"),
    ],
)
def test_auto_is_space_to_depth_on_tpus_where_the_model_allows_it(platform, overrides, expected):
  model = unet.create_model(_model_config(**overrides), platform=platform)
  assert model.final_block == expected


def test_a_configuration_without_final_block_is_auto():
  config = _model_config()
  del config["final_block"]
  assert unet.create_model(config, platform="tpu").final_block == "space_to_depth"


@pytest.mark.parametrize(
    "overrides",
    [
        {"final_block": "packed"},
        {"final_block": "space_to_depth", "upsample": "bilinear"},
        {"final_block": "space_to_depth", "hypercolumn": True},
    ],
)
def test_impossible_final_blocks_are_refused_naming_the_option(overrides):
  with pytest.raises(ValueError, match="model.final_block"):
    unet.create_model(_model_config(**overrides))
  config = quick.get_config()
  config.model.update(overrides)
  problems = []
  config_checks._check_model(config, lambda ok, key, why: ok or problems.append(key))
  assert problems == ["model.final_block"]

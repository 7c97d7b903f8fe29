"""Tests for saltjax.model.{layers,resnet,unet}: the U-Net and its parts.

Expected numbers come from outside the code under test: published parameter
counts (torchvision / segmentation_models_pytorch), output sizes worked out by
hand from torch's conv arithmetic, and hand-written numpy reference ops.
Full-size models are only traced (jax.eval_shape); anything that really runs
uses tiny widths.
"""

import functools
import types

import flax
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from saltjax.model import layers
from saltjax.model import resnet
from saltjax.model import unet

# Tiny but structurally complete (4 stages, 5 decoder blocks, scSE everywhere).
TINY = dict(
    stage_sizes=(1, 1, 1, 1), encoder_width=4, scse_reduction=4, decoder_channels=(16, 8, 8, 4, 4)
)


def _init_shapes(model, shape):
  """Variables and outputs of model.init on zeros(shape), traced only."""
  out, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.PRNGKey(0), x),
      jax.ShapeDtypeStruct(shape, jnp.float32),
  )
  return out, variables


def _fake_init(model, x, seed=0):
  """Variables with model.init's structure, filled cheaply from numpy.

  A real model.init compiles a random-number kernel per parameter, which
  takes tens of seconds on a small CPU; the structure (traced by eval_shape)
  is what matters here, and the values only need to be reasonable.
  """
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "kernel" in name:
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)
    elif "scale" in name or "var" in name:
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # biases and running means
      value = 0.1 * rng.standard_normal(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _conv_torch_style(x, kernel, stride, pad_lo, pad_hi=None):
  """Reference NHWC x HWIO convolution with torch's zero padding, in float64."""
  pad_hi = pad_lo if pad_hi is None else pad_hi
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad_lo, pad_hi), (pad_lo, pad_hi), (0, 0)))
  kernel = np.asarray(kernel, np.float64)
  kh, kw = kernel.shape[:2]
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
  for i in range(out_h):
    for j in range(out_w):
      window = x[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
      out[:, i, j, :] = np.einsum("nhwc,hwco->no", window, kernel)
  return out


# --- Parameter counts (published figures). ---


def test_resnet50_encoder_param_count():
  # torchvision resnet50 without its fc layer: 25,557,032 - 2,049,000.
  _, variables = _init_shapes(resnet.ResNet50Encoder(), (1, 64, 64, 3))
  assert unet.count_params(variables["params"]) == 23_508_032


@pytest.mark.parametrize(
    "scse_decoder, expected",
    [
        # smp Unet('resnet50', in_channels=1, classes=1,
        # decoder_attention_type='scse') counts 33,809,804: 195 of them are the
        # 32-channel input scSE of its last block (32*2+2 + 2*32+32 + 32+1),
        # which smp builds but never calls (no skip there).
        (True, 33_809_804 - 195),
        (False, 32_514_833),  # smp Unet('resnet50', in_channels=1, classes=1)
    ],
)
def test_unet_param_count_matches_smp(scse_decoder, expected):
  model = unet.UNet(in_channels=1, scse_encoder=False, scse_decoder=scse_decoder)
  _, variables = _init_shapes(model, (1, 128, 128, 1))
  assert unet.count_params(variables["params"]) == expected
  # Running statistics are state, not parameters.
  assert "batch_stats" in variables
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))


def test_count_params():
  tree = {"a": np.zeros((2, 3)), "b": {"c": np.zeros(5)}}
  assert unet.count_params(tree) == 11


# --- Shapes. ---


@pytest.mark.parametrize(
    "size, spatial",
    [
        # torch: conv7/2 pad 3 and 3x3/2 pad 1 both give floor((n - 1) / 2) + 1.
        (101, (51, 26, 13, 7, 4)),
        (128, (64, 32, 16, 8, 4)),
        (256, (128, 64, 32, 16, 8)),
    ],
)
def test_resnet50_feature_shapes(size, spatial):
  features, _ = _init_shapes(resnet.ResNet50Encoder(), (2, size, size, 3))
  channels = (64, 256, 512, 1024, 2048)
  assert [f.shape for f in features] == [(2, s, s, c) for s, c in zip(spatial, channels)]


@pytest.mark.parametrize("size, upsample", [(101, "nearest"), (128, "bilinear")])
def test_unet_logits_match_input_size(size, upsample):
  model = unet.UNet(in_channels=1, upsample=upsample, **TINY)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, size, size, 1))
  variables = _fake_init(model, x)
  out = jax.jit(model.apply)(variables, x)
  assert set(out) == {"logits"}
  assert out["logits"].shape == (2, size, size)
  assert out["logits"].dtype == jnp.float32
  assert np.all(np.isfinite(out["logits"]))


def test_unet_optional_heads():
  model = unet.UNet(in_channels=3, hypercolumn=True, deep_supervision=True, classifier=True, **TINY)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 101, 101, 1))
  variables = _fake_init(model, x)
  out = jax.jit(model.apply)(variables, x)
  assert out["logits"].shape == (2, 101, 101)
  assert len(out["side_logits"]) == len(TINY["decoder_channels"])
  for side in out["side_logits"]:
    assert side.shape == (2, 101, 101) and side.dtype == jnp.float32
  assert out["class_logits"].shape == (2,)
  assert out["class_logits"].dtype == jnp.float32
  # The hypercolumn head sees every decoder block's channels.
  assert variables["params"]["head"]["kernel"].shape == (3, 3, sum(TINY["decoder_channels"]), 1)


def test_unet_train_mode_updates_batch_stats():
  model = unet.UNet(**TINY)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 1))
  variables = _fake_init(model, x)
  out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x
  )
  assert out["logits"].shape == (2, 64, 64)
  old = variables["batch_stats"]["encoder"]["bn1"]["mean"]
  new = updates["batch_stats"]["encoder"]["bn1"]["mean"]
  assert not np.allclose(old, new)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model = unet.UNet(dtype=jnp.bfloat16, deep_supervision=True, classifier=True, **TINY)
  x = jax.random.uniform(jax.random.PRNGKey(1), (1, 64, 64, 1))
  variables = _fake_init(model, x)
  for leaf in jax.tree_util.tree_leaves(variables):
    assert leaf.dtype == jnp.float32
  out = jax.jit(model.apply)(variables, x)
  assert out["logits"].dtype == jnp.float32
  assert out["class_logits"].dtype == jnp.float32
  assert all(s.dtype == jnp.float32 for s in out["side_logits"])
  assert np.all(np.isfinite(out["logits"]))


# --- Numerics against numpy. ---


def test_scse_matches_numpy():
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (2, 5, 6, 8)), np.float64)
  module = layers.ScSE(reduction=4)
  params = module.init(jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32))
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])
  got = module.apply(params, jnp.asarray(x, jnp.float32))

  sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))
  pooled = x.mean(axis=(1, 2))  # (N, C)
  w1 = p["cse_reduce"]["kernel"].reshape(8, 2)
  w2 = p["cse_expand"]["kernel"].reshape(2, 8)
  hidden = np.maximum(pooled @ w1 + p["cse_reduce"]["bias"], 0.0)
  cse = sigmoid(hidden @ w2 + p["cse_expand"]["bias"])  # (N, C)
  ws = p["sse"]["kernel"].reshape(8, 1)
  sse = sigmoid(x @ ws + p["sse"]["bias"])  # (N,H,W,1)
  expected = x * cse[:, None, None, :] + x * sse
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_scse_reduction_larger_than_channels_keeps_one_channel():
  module = layers.ScSE(reduction=16)
  params = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 8)))
  assert params["params"]["cse_reduce"]["kernel"].shape == (1, 1, 8, 1)


def test_identity_init_scse_is_the_identity_and_learns():
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 6, 6, 32))
  module = layers.ScSE(reduction=4, identity_init=True)
  params = module.init(jax.random.PRNGKey(0), x)
  # Both gates start at sigmoid(0) = 0.5: x * 0.5 + x * 0.5 = x.
  np.testing.assert_array_equal(module.apply(params, x), x)
  # ... and both gates get gradients from the first step on.
  target = jax.random.normal(jax.random.PRNGKey(6), x.shape)
  grads = jax.grad(lambda p: jnp.sum(module.apply(p, x) * target))(params)
  for name in ("sse", "cse_expand"):
    assert np.abs(grads["params"][name]["kernel"]).max() > 1e-3, name


@pytest.mark.parametrize("train", [False, True])
def test_encoder_scse_starts_as_the_pretrained_encoder(train):
  # Pretrained-like weights for the encoder without scSE, copied into a
  # freshly initialised encoder with scSE (what merge_encoder does with
  # ImageNet weights): the features must be those of the plain encoder.
  # Width 16 puts scSE on 64 to 512 channels, where a fan-out-initialised
  # spatial gate would have logits of std ~ sqrt(2 C) = 11 to 32.
  x = jax.random.normal(jax.random.PRNGKey(7), (2, 64, 64, 3))
  plain = resnet.ResNetEncoder(stage_sizes=(1, 1, 1, 1), num_filters=16)
  with_scse = resnet.ResNetEncoder(stage_sizes=(1, 1, 1, 1), num_filters=16, scse=True)
  pretrained = _fake_init(plain, x, seed=1)
  variables = flax.core.unfreeze(jax.jit(with_scse.init)(jax.random.PRNGKey(0), x))
  copied = 0
  for collection, tree in pretrained.items():
    target = flax.traverse_util.flatten_dict(variables[collection])
    for path, value in flax.traverse_util.flatten_dict(tree).items():
      assert target[path].shape == value.shape
      target[path] = value
      copied += 1
    variables[collection] = flax.traverse_util.unflatten_dict(target)
  assert copied == len(jax.tree_util.tree_leaves(pretrained))
  extra = set(flax.traverse_util.flatten_dict(variables["params"])) - set(
      flax.traverse_util.flatten_dict(pretrained["params"])
  )
  assert extra and all("scse" in path[1] for path in extra)

  def features(model, v):
    if train:
      return model.apply(v, x, train=True, mutable=["batch_stats"])[0]
    return model.apply(v, x)

  want = jax.jit(functools.partial(features, plain))(pretrained)
  got = jax.jit(functools.partial(features, with_scse))(variables)
  for g, w in zip(got, want):
    scale = float(np.abs(w).max())
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale)


def test_stride2_bottleneck_matches_torch_style_numpy():
  # An even input is where flax's 'SAME' (pad 0 before, 1 after) and torch's
  # padding=1 (1 before, 1 after) disagree for a stride-2 3x3 conv.
  model = resnet.ResNetEncoder(stage_sizes=(1, 1), num_filters=4)
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 32, 32, 3))
  variables = _fake_init(model, x)
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]["layer2_0"]
  conv_in = np.maximum(np.asarray(inter["bn1"]["__call__"][0]), 0.0)
  assert conv_in.shape == (1, 8, 8, 8)
  kernel = variables["params"]["layer2_0"]["conv2"]["kernel"]
  got = np.asarray(inter["conv2"]["__call__"][0])
  assert got.shape == (1, 4, 4, 8)

  torch_style = _conv_torch_style(conv_in, kernel, stride=2, pad_lo=1)
  np.testing.assert_allclose(got, torch_style, rtol=1e-4, atol=1e-4)
  same_style = _conv_torch_style(conv_in, kernel, stride=2, pad_lo=0, pad_hi=1)
  assert not np.allclose(got, same_style, rtol=1e-3, atol=1e-3)

  # The 1x1 stride-2 projection samples the even positions, as in torch.
  ds_kernel = variables["params"]["layer2_0"]["downsample_conv"]["kernel"]
  block_in = np.asarray(state["intermediates"]["layer1_0"]["__call__"][0], np.float64)
  np.testing.assert_allclose(
      inter["downsample_conv"]["__call__"][0],
      _conv_torch_style(block_in, ds_kernel, stride=2, pad_lo=0),
      rtol=1e-4,
      atol=1e-4,
  )

  # The whole block, as torchvision's Bottleneck.forward in eval mode:
  # conv1-bn1-relu, conv2 (stride 2)-bn2-relu, conv3-bn3, + downsample, relu.
  p = variables["params"]["layer2_0"]
  s = variables["batch_stats"]["layer2_0"]

  def bn(y, name):
    return (y - s[name]["mean"]) / np.sqrt(s[name]["var"] + 1e-5) * p[name]["scale"] + p[name][
        "bias"
    ]

  y = np.maximum(bn(_conv_torch_style(block_in, p["conv1"]["kernel"], 1, 0), "bn1"), 0.0)
  y = np.maximum(bn(_conv_torch_style(y, p["conv2"]["kernel"], 2, 1), "bn2"), 0.0)
  y = bn(_conv_torch_style(y, p["conv3"]["kernel"], 1, 0), "bn3")
  shortcut = bn(_conv_torch_style(block_in, ds_kernel, 2, 0), "downsample_bn")
  expected = np.maximum(y + shortcut, 0.0)
  assert expected.shape == (1, 4, 4, 32)
  np.testing.assert_allclose(inter["__call__"][0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_unet_normalises_with_imagenet_statistics(in_channels):
  x = jax.random.uniform(jax.random.PRNGKey(4), (2, 5, 5, 1))
  model = unet.UNet(in_channels=in_channels, **TINY)
  # pylint: disable-next=protected-access
  got = model.apply({}, x, method=unet.UNet._normalize)
  if in_channels == 1:
    expected = (np.asarray(x) - 0.449) / 0.226
  else:
    rgb = np.repeat(np.asarray(x), 3, axis=-1)
    expected = (rgb - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# --- create_model. ---


def _config(**overrides):
  cfg = ml_collections.ConfigDict(
      dict(
          stage_sizes=(3, 4, 6, 3),
          encoder_width=64,
          in_channels=1,
          scse_encoder=True,
          scse_decoder=True,
          scse_reduction=16,
          decoder_channels=(256, 128, 64, 32, 16),
          upsample="nearest",
          hypercolumn=False,
          deep_supervision=False,
          classifier=False,
          dtype="auto",
      )
  )
  cfg.update(overrides)
  return cfg


def test_create_model_builds_configured_unet():
  model = unet.create_model(_config(upsample="bilinear", classifier=True))
  assert isinstance(model, unet.UNet)
  assert model.upsample == "bilinear" and model.classifier
  assert tuple(model.stage_sizes) == (3, 4, 6, 3)
  # 'auto' is float32 on CPU; the argument overrides the config.
  assert model.dtype == jnp.float32
  assert unet.create_model(_config(), dtype="bfloat16").dtype == jnp.bfloat16
  assert unet.create_model(_config(dtype="bfloat16")).dtype == jnp.bfloat16


def test_create_model_accepts_plain_attribute_objects():
  cfg = types.SimpleNamespace(**_config(**TINY).to_dict())
  model = unet.create_model(cfg, dtype=jnp.float32)
  assert model.encoder_width == 4


@pytest.mark.parametrize(
    "option, value",
    [
        ("upsample", "bicubic"),
        ("dtype", "float16"),
        ("stage_sizes", ()),
        ("encoder_width", 0),
        ("decoder_channels", (256, 128, 0, 32, 16)),
        ("decoder_channels", (256, 128, 64)),
        ("scse_reduction", -1),
        ("in_channels", 2),
    ],
)
def test_create_model_rejects_bad_options(option, value):
  with pytest.raises(ValueError, match=option):
    unet.create_model(_config(**{option: value}))

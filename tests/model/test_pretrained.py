"""Tests for saltjax.model.pretrained.

The reference state dict is written out by hand from torchvision's ResNet50
(`torchvision.models.resnet._make_layer` with Bottleneck blocks), not derived
from saltjax's modules, and the expected values are computed in numpy.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from saltjax.model import resnet
from saltjax.model import unet
from saltjax.model import pretrained


def _torchvision_resnet50_shapes():
  """{name: shape} of torchvision resnet50().state_dict(), by hand."""
  shapes = {"conv1.weight": (64, 3, 7, 7)}

  def bn(name, c):
    for suffix in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.{suffix}"] = (c,)
    shapes[f"{name}.num_batches_tracked"] = ()

  bn("bn1", 64)
  inplanes = 64
  for layer, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
    for b in range(blocks):
      p = f"layer{layer}.{b}"
      shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
      bn(f"{p}.bn1", planes)
      shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
      bn(f"{p}.bn2", planes)
      shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
      bn(f"{p}.bn3", planes * 4)
      if b == 0:  # stride != 1 or inplanes != planes * 4
        shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
        bn(f"{p}.downsample.1", planes * 4)
      inplanes = planes * 4
  shapes["fc.weight"] = (1000, 2048)
  shapes["fc.bias"] = (1000,)
  return shapes


def _random_state_dict(seed=0):
  rng = np.random.default_rng(seed)
  state = {}
  for name, shape in _torchvision_resnet50_shapes().items():
    if name.endswith("num_batches_tracked"):
      state[name] = np.array(100, np.int64)
    elif name.endswith("running_var"):
      state[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      state[name] = rng.standard_normal(shape, dtype=np.float32)
  return state


def _flax_location(torch_name):
  """Where a torch key should land: (collection, path tuple), by hand."""
  module, leaf = torch_name.rsplit(".", 1)
  parts = module.split(".")
  if parts[0].startswith("layer"):
    path = [f"{parts[0]}_{parts[1]}"]
    rest = parts[2:]
    path.append(
        {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(
            ".".join(rest), ".".join(rest)
        )
    )
  else:
    path = [module]
  collection, flax_leaf = {
      "weight": ("params", "kernel" if "conv" in path[-1] else "scale"),
      "bias": ("params", "bias"),
      "running_mean": ("batch_stats", "mean"),
      "running_var": ("batch_stats", "var"),
  }[leaf]
  return collection, tuple(path) + (flax_leaf,)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


@pytest.fixture(scope="module")
def state_dict():
  return _random_state_dict()


@pytest.fixture(scope="module")
def weight_files(state_dict, tmp_path_factory):
  directory = tmp_path_factory.mktemp("weights")
  files = {
      "safetensors": str(directory / "resnet50.safetensors"),
      "npz": str(directory / "resnet50.npz"),
  }
  save_file(state_dict, files["safetensors"])
  np.savez(files["npz"], **state_dict)
  return files


@pytest.fixture(scope="module")
def loaded(weight_files):
  return pretrained.load_resnet50(weight_files["safetensors"])


def test_hand_written_state_dict_has_resnet50_size(state_dict):
  # Sanity check of the reference itself against the published count.
  trainable = sum(
      v.size
      for k, v in state_dict.items()
      if not k.startswith("fc.") and "running" not in k and "num_batches" not in k
  )
  assert trainable == 23_508_032


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_every_leaf_lands_in_place(fmt, state_dict, weight_files):
  variables = pretrained.load_resnet50(weight_files[fmt])
  assert set(variables) == {"params", "batch_stats"}
  expected_leaves = 0
  for name, value in state_dict.items():
    if name.startswith("fc.") or name.endswith("num_batches_tracked"):
      continue
    collection, path = _flax_location(name)
    got = _get(variables[collection], path)
    want = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    np.testing.assert_array_equal(got, want, err_msg=name)
    expected_leaves += 1
  assert len(jax.tree_util.tree_leaves(variables)) == expected_leaves
  # A spot check written out in full.
  np.testing.assert_array_equal(
      variables["params"]["layer2_0"]["conv2"]["kernel"],
      state_dict["layer2.0.conv2.weight"].transpose(2, 3, 1, 0),
  )


def test_loaded_tree_matches_encoder_structure(loaded):
  shapes = jax.eval_shape(
      resnet.ResNet50Encoder(scse=False).init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))
  )
  want = jax.tree_util.tree_map(lambda s: s.shape, shapes)
  got = jax.tree_util.tree_map(np.shape, loaded)
  assert got == want


def test_stem_output_matches_numpy(loaded, state_dict):
  # Eval-mode stem: conv 7x7 stride 2 with torch padding 3, BN with running
  # statistics, ReLU; computed from the torch-layout (OIHW) weights.
  x = np.random.default_rng(1).uniform(0, 1, (1, 10, 10, 3))
  w = state_dict["conv1.weight"].astype(np.float64)
  xp = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
  out_size = (10 + 2 * 3 - 7) // 2 + 1
  conv = np.zeros((1, out_size, out_size, 64))
  for i in range(out_size):
    for j in range(out_size):
      window = xp[0, 2 * i : 2 * i + 7, 2 * j : 2 * j + 7, :]  # (kh, kw, c)
      conv[0, i, j] = np.einsum("hwc,ochw->o", window, w)
  bn = lambda k: state_dict[f"bn1.{k}"].astype(np.float64)
  expected = np.maximum(
      (conv - bn("running_mean")) / np.sqrt(bn("running_var") + 1e-5) * bn("weight") + bn("bias"),
      0.0,
  )

  model = resnet.ResNetEncoder(stage_sizes=(3, 4, 6, 3))
  stem = jax.jit(lambda v, x: model.apply(v, x)[0])(loaded, jnp.asarray(x, jnp.float32))
  assert stem.shape == (1, 5, 5, 64)
  np.testing.assert_allclose(stem, expected, rtol=1e-4, atol=1e-3)


# ImageNet statistics as torchvision publishes them, and the gray model's
# single mean/std, written out here rather than read from saltjax.model.unet.
RGB_MEAN = np.array([0.485, 0.456, 0.406])
RGB_STD = np.array([0.229, 0.224, 0.225])
GRAY_MEAN, GRAY_STD = 0.449, 0.226


def _torch_conv_stride2_pad3(x, w):
  """conv2d(x, w, stride=2, padding=3) by loops: x (H, W, C), w OIHW."""
  xp = np.pad(x, ((3, 3), (3, 3), (0, 0)))
  out = (x.shape[0] + 6 - 7) // 2 + 1
  y = np.zeros((out, out, w.shape[0]))
  for i in range(out):
    for j in range(out):
      y[i, j] = np.einsum("hwc,ochw->o", xp[2 * i : 2 * i + 7, 2 * j : 2 * j + 7], w)
  return y


def test_gray_stem_sees_what_the_rgb_stem_sees(weight_files, state_dict, loaded):
  """Gray model on g == torchvision's RGB stem on (g, g, g), normalisation included.

  Truth: torchvision's eval-mode stem (conv 7x7/2 pad 3, bn1, ReLU) on the
  gray image repeated to RGB and normalised per channel, in float64 numpy
  from the torch-layout weights. The gray model runs as training and
  prediction run it: UNet(in_channels=1) normalises, the loaded weights are
  merged in, the encoder computes the stem.
  """
  gray = pretrained.load_resnet50(weight_files["npz"], in_channels=1)
  assert gray["params"]["conv1"]["kernel"].shape == (7, 7, 1, 64)
  # Everything but the stem is unchanged.
  np.testing.assert_array_equal(
      gray["params"]["layer4_2"]["conv3"]["kernel"], loaded["params"]["layer4_2"]["conv3"]["kernel"]
  )
  np.testing.assert_array_equal(
      gray["batch_stats"]["bn1"]["var"], loaded["batch_stats"]["bn1"]["var"]
  )

  size = 24
  g = np.random.default_rng(5).uniform(0, 1, (size, size))
  w = state_dict["conv1.weight"].astype(np.float64)
  rgb = (np.repeat(g[..., None], 3, axis=-1) - RGB_MEAN) / RGB_STD
  conv = _torch_conv_stride2_pad3(rgb, w)
  bn = lambda k: state_dict[f"bn1.{k}"].astype(np.float64)
  batch_norm = lambda y: (
      (y - bn("running_mean")) / np.sqrt(bn("running_var") + 1e-5) * bn("weight") + bn("bias")
  )
  rgb_stem = np.maximum(batch_norm(conv), 0.0)

  model = unet.UNet(
      in_channels=1, scse_encoder=False, scse_decoder=False, decoder_channels=(8, 8, 8, 8, 8)
  )
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size)))
  variables = pretrained.merge_encoder(_zeros_like_shapes(shapes), gray)
  _, state = model.apply(
      variables,
      jnp.asarray(g[None], jnp.float32),
      capture_intermediates=lambda mdl, _: isinstance(mdl, resnet.ResNetEncoder),
      mutable=["intermediates"],
  )
  gray_stem = np.asarray(state["intermediates"]["encoder"]["__call__"][0][0][0])
  assert gray_stem.shape == rgb_stem.shape == (12, 12, 64)

  # Away from the zero padding (windows inside the image): equal.
  np.testing.assert_allclose(gray_stem[2:-2, 2:-2], rgb_stem[2:-2, 2:-2], rtol=1e-4, atol=1e-4)
  # Where the window reaches into the padding, the RGB model pads each
  # channel with its own mean, which one gray channel cannot; the gray stem
  # differs by exactly the padded taps of sum_c K_c (m - m_c) / s_c.
  per_tap = np.einsum("ochw,c->ohw", w, (GRAY_MEAN - RGB_MEAN) / RGB_STD)
  in_image = _torch_conv_stride2_pad3(np.ones((size, size, 1)), per_tap[:, None])
  padded_share = per_tap.sum(axis=(1, 2)) - in_image
  assert np.abs(padded_share[2:-2, 2:-2]).max() < 1e-9
  np.testing.assert_allclose(
      gray_stem, np.maximum(batch_norm(conv + padded_share), 0.0), rtol=1e-4, atol=1e-4
  )


def _save_variant(state, path):
  if path.endswith(".npz"):
    np.savez(path, **state)
  else:
    save_file(state, path)
  return path


def test_common_prefix_is_stripped(state_dict, loaded, tmp_path):
  prefixed = {f"module.encoder.{k}": v for k, v in state_dict.items()}
  variables = pretrained.load_resnet50(_save_variant(prefixed, str(tmp_path / "p.safetensors")))
  np.testing.assert_array_equal(
      variables["params"]["conv1"]["kernel"], loaded["params"]["conv1"]["kernel"]
  )


def test_fc_is_optional(state_dict, tmp_path):
  no_fc = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
  pretrained.load_resnet50(_save_variant(no_fc, str(tmp_path / "x.npz")))


def test_missing_key_is_named(state_dict, tmp_path):
  broken = dict(state_dict)
  del broken["layer3.2.bn2.running_var"]
  path = _save_variant(broken, str(tmp_path / "missing.npz"))
  with pytest.raises(ValueError, match=r"(?s)missing\.npz.*layer3\.2\.bn2\.running_var"):
    pretrained.load_resnet50(path)


def test_extra_key_is_named(state_dict, tmp_path):
  broken = dict(state_dict)
  broken["layer5.0.conv1.weight"] = np.zeros((3, 3, 1, 1), np.float32)
  path = _save_variant(broken, str(tmp_path / "extra.npz"))
  with pytest.raises(ValueError, match=r"(?s)extra\.npz.*layer5\.0\.conv1\.weight"):
    pretrained.load_resnet50(path)


def test_wrong_shape_is_named(state_dict, tmp_path):
  broken = dict(state_dict)
  broken["layer2.0.conv2.weight"] = np.zeros((128, 128, 1, 1), np.float32)
  path = _save_variant(broken, str(tmp_path / "shape.npz"))
  with pytest.raises(ValueError, match=r"(?s)shape\.npz.*layer2\.0\.conv2\.weight"):
    pretrained.load_resnet50(path)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_pth_without_torch_says_how_to_convert(tmp_path):
  path = tmp_path / "resnet50.pth"
  path.write_bytes(b"not really a checkpoint")
  with pytest.raises(ImportError, match="safetensors"):
    pretrained.load_resnet50(str(path))


def test_unknown_extension(tmp_path):
  with pytest.raises(ValueError, match="unsupported"):
    pretrained.load_resnet50(os.path.join(str(tmp_path), "weights.h5"))


def _zeros_like_shapes(shapes):
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@pytest.fixture(scope="module")
def unet_variables():
  model = unet.UNet(in_channels=3, scse_encoder=True, scse_decoder=True)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  return _zeros_like_shapes(shapes)


def test_merge_encoder(unet_variables, loaded, state_dict):
  merged = pretrained.merge_encoder(unet_variables, loaded)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(unet_variables)
  enc = merged["params"]["encoder"]
  np.testing.assert_array_equal(
      enc["layer3_5"]["conv2"]["kernel"], state_dict["layer3.5.conv2.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
      merged["batch_stats"]["encoder"]["layer1_0"]["downsample_bn"]["var"],
      state_dict["layer1.0.downsample.1.running_var"],
  )
  # Leaves that are not in the file keep their initial values (zeros here).
  for leaf in jax.tree_util.tree_leaves(enc["layer2_1"]["scse"]):
    assert not np.any(leaf)
  for leaf in jax.tree_util.tree_leaves(merged["params"]["decoder_0"]):
    assert not np.any(leaf)
  # The input is not modified.
  assert not np.any(unet_variables["params"]["encoder"]["conv1"]["kernel"])


def test_merge_encoder_shape_mismatch_is_named(unet_variables, loaded):
  gray_stem = jax.tree_util.tree_map(lambda a: a, loaded)
  gray_stem["params"]["conv1"]["kernel"] = np.zeros((7, 7, 1, 64), np.float32)
  with pytest.raises(ValueError, match="params/encoder/conv1/kernel"):
    pretrained.merge_encoder(unet_variables, gray_stem)


def test_merge_encoder_unknown_leaf_is_named(unet_variables):
  extra = {"params": {"layer9_0": {"conv1": {"kernel": np.zeros((1,))}}}}
  with pytest.raises(ValueError, match="layer9_0/conv1/kernel"):
    pretrained.merge_encoder(unet_variables, extra)

"""Loads torchvision/timm ResNet50 ImageNet weights into the flax encoder.

The weights are read from a torch-named state dict stored as `.safetensors`
or `.npz` (torch itself is not needed), or `.pth`/`.pt` when torch happens to
be installed. Names map 1:1 onto `saltjax.model.resnet.ResNetEncoder`:

  conv1.weight                     -> params/conv1/kernel (OIHW -> HWIO)
  bn1.weight / bn1.bias            -> params/bn1/scale / bias
  bn1.running_mean / running_var   -> batch_stats/bn1/mean / var
  layer{i}.{j}.conv{k}, .bn{k}     -> layer{i}_{j}/conv{k}, bn{k}
  layer{i}.{j}.downsample.0 / .1   -> layer{i}_{j}/downsample_conv / _bn

`num_batches_tracked` and the classifier (`fc.*`) are ignored; anything else
that is missing, unexpected or mis-shaped is an error.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from flax import traverse_util
import flax.core
import jax.numpy as jnp
import numpy as np

from saltjax.model import unet

RESNET50_STAGE_SIZES = (3, 4, 6, 3)

_TORCH_TO_SAFETENSORS = (
    'python -c "import torch, safetensors.torch as st; '
    "sd = torch.load('resnet50.pth', map_location='cpu'); "
    "sd = sd.get('state_dict', sd); "
    "st.save_file({k: v.float().contiguous() for k, v in sd.items()}, "
    "'resnet50.safetensors')\""
)

_TOP_LEVEL = ("conv1", "bn1", "fc")


def _expected_layout(stage_sizes=RESNET50_STAGE_SIZES, width=64):
  """Maps every torch key to (collection, flax path, torch shape).

  The torch shapes are derived from torchvision's Bottleneck ResNet: stage i
  has width w = width * 2**i, blocks conv1 (w, c_in, 1, 1), conv2 (w, w, 3, 3),
  conv3 (4w, w, 1, 1), and a downsample (4w, c_in, 1, 1) in block 0.
  """
  layout = {}

  def conv(torch_name, flax_path, shape):
    layout[f"{torch_name}.weight"] = ("params", flax_path + ("kernel",), shape)

  def bn(torch_name, flax_path, channels):
    for suffix, col, leaf in (
        ("weight", "params", "scale"),
        ("bias", "params", "bias"),
        ("running_mean", "batch_stats", "mean"),
        ("running_var", "batch_stats", "var"),
    ):
      layout[f"{torch_name}.{suffix}"] = (col, flax_path + (leaf,), (channels,))

  conv("conv1", ("conv1",), (width, 3, 7, 7))
  bn("bn1", ("bn1",), width)
  in_ch = width
  for i, num_blocks in enumerate(stage_sizes):
    w = width * 2**i
    for j in range(num_blocks):
      t, f = f"layer{i + 1}.{j}", (f"layer{i + 1}_{j}",)
      conv(f"{t}.conv1", f + ("conv1",), (w, in_ch, 1, 1))
      bn(f"{t}.bn1", f + ("bn1",), w)
      conv(f"{t}.conv2", f + ("conv2",), (w, w, 3, 3))
      bn(f"{t}.bn2", f + ("bn2",), w)
      conv(f"{t}.conv3", f + ("conv3",), (4 * w, w, 1, 1))
      bn(f"{t}.bn3", f + ("bn3",), 4 * w)
      if j == 0:
        conv(f"{t}.downsample.0", f + ("downsample_conv",), (4 * w, in_ch, 1, 1))
        bn(f"{t}.downsample.1", f + ("downsample_bn",), 4 * w)
      in_ch = 4 * w
  return layout


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a flat {name: array} state dict from .safetensors/.npz/.pth/.pt."""
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    import safetensors.numpy  # pylint: disable=g-import-not-at-top

    return dict(safetensors.numpy.load_file(path))
  if ext == ".npz":
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  if ext in (".pth", ".pt"):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(
          f"{path}: reading .pth/.pt needs torch, which saltjax does not "
          "require. Convert the file to .safetensors once, where torch is "
          f"installed:\n  {_TORCH_TO_SAFETENSORS}"
      ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Training checkpoints often wrap the weights.
    for wrapper in ("state_dict", "model", "model_state_dict"):
      if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
        state = state[wrapper]
    return {k: v.detach().float().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}
  raise ValueError(
      f"{path}: unsupported weight file type {ext!r}; use "
      ".safetensors, .npz, or .pth/.pt (with torch installed)."
  )


def _strip_common_prefix(state: dict[str, Any]) -> dict[str, Any]:
  """Strips prefixes like 'module.' or 'encoder.' shared by every key."""
  while state:
    heads = {k.split(".", 1)[0] for k in state}
    if len(heads) != 1 or any("." not in k for k in state):
      break
    head = heads.pop()
    if head in _TOP_LEVEL or head.startswith("layer"):
      break
    state = {k.split(".", 1)[1]: v for k, v in state.items()}
  return state


def _format_keys(keys) -> str:
  keys = sorted(keys)
  shown = ", ".join(keys[:12])
  return shown + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")


def load_resnet50(path: str, in_channels: int = 3) -> dict[str, Any]:
  """Loads torchvision/timm ResNet50 weights for `ResNet50Encoder(scse=False)`.

  Args:
    path: a torch-named ResNet50 state dict as .safetensors or .npz (or
      .pth/.pt if torch is installed). A prefix shared by all keys, such as
      'module.' or 'encoder.', is stripped.
    in_channels: 3 keeps the RGB stem; 1 folds the RGB stem and its
      per-channel ImageNet normalisation into a 1-channel stem (see
      `fold_gray_stem`): a gray image then gives the stem output of that
      image repeated to RGB.

  Returns:
    {'params': ..., 'batch_stats': ...} as nested dicts of float32 numpy
    arrays, laid out like `ResNet50Encoder().init(...)`.

  Raises:
    ValueError: for missing, unexpected or mis-shaped keys (named, with the
      file), or an unsupported in_channels.
    ImportError: for a .pth/.pt file when torch is not installed.
  """
  if in_channels not in (1, 3):
    raise ValueError(f"in_channels must be 1 or 3, got {in_channels}.")
  state = _strip_common_prefix(_read_state_dict(path))
  layout = _expected_layout()

  ignored = {k for k in state if k.endswith("num_batches_tracked") or k.split(".")[0] == "fc"}
  missing = set(layout) - set(state)
  extra = set(state) - set(layout) - ignored
  if missing or extra:
    problems = []
    if missing:
      problems.append(f"missing keys: {_format_keys(missing)}")
    if extra:
      problems.append(f"unexpected keys: {_format_keys(extra)}")
    raise ValueError(
        f"{path} is not a torchvision/timm ResNet50 state dict; " + "; ".join(problems)
    )

  bad_shapes = []
  for key, (_, _, shape) in layout.items():
    got = tuple(np.shape(state[key]))
    if got != shape:
      bad_shapes.append(f"{key} has shape {got}, expected {shape}")
  if bad_shapes:
    raise ValueError(f"{path}: mis-shaped weights: " + "; ".join(bad_shapes))

  flat = {}
  for key, (collection, flax_path, _) in layout.items():
    value = np.asarray(state[key], dtype=np.float32)
    if value.ndim == 4:
      value = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    flat[(collection,) + flax_path] = value
  if in_channels == 1:
    kernel, bn1_mean = fold_gray_stem(
        flat[("params", "conv1", "kernel")], flat[("batch_stats", "bn1", "mean")]
    )
    flat[("params", "conv1", "kernel")] = kernel
    flat[("batch_stats", "bn1", "mean")] = bn1_mean
  return traverse_util.unflatten_dict(flat)


def fold_gray_stem(kernel: np.ndarray, bn1_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The RGB stem's per-channel normalisation, folded into a 1-channel stem.

  The RGB model sees x_c = (g - m_c) / s_c for a gray image g repeated to RGB;
  the gray model sees one channel (g - m) / s (`unet.IMAGENET_MEAN_GRAY`,
  `IMAGENET_STD_GRAY`). Over a window inside the image the RGB stem's conv is

    sum_c K_c (g - m_c) / s_c = [s sum_c K_c / s_c] (g - m) / s + b,
    b = sum over the 7x7 taps of sum_c K_c (m - m_c) / s_c  (per channel),

  so the gray kernel is s sum_c K_c / s_c, and the constant b, which bn1
  subtracts, moves into its running mean. Training from batch statistics
  removes any per-channel constant, so only the running mean needs it.

  Where the 7x7 window reaches into the zero padding (the first and last 2
  rows and columns of the stem output) the padded taps contribute nothing in
  either model, so the RGB conv holds only the in-image taps' share of b
  while the running mean accounts for all of it: the gray stem differs there
  by the padded taps' share. No 1-channel stem can match it, because the
  RGB model's padding is a different raw value in each channel.

  Args:
    kernel: the RGB stem kernel, HWIO (7, 7, 3, 64).
    bn1_mean: bn1's running mean (64,).

  Returns:
    The (7, 7, 1, 64) gray kernel and bn1's running mean, float32.
  """
  kernel = np.asarray(kernel, np.float64)
  mean_rgb = np.asarray(unet.IMAGENET_MEAN_RGB, np.float64)
  std_rgb = np.asarray(unet.IMAGENET_STD_RGB, np.float64)
  per_input = kernel / std_rgb[:, None]  # K_c / s_c, channel axis 2
  gray_kernel = unet.IMAGENET_STD_GRAY * per_input.sum(axis=2, keepdims=True)
  offset = (per_input * (unet.IMAGENET_MEAN_GRAY - mean_rgb)[:, None]).sum(axis=(0, 1, 2))
  return (
      gray_kernel.astype(np.float32),
      (np.asarray(bn1_mean, np.float64) - offset).astype(np.float32),
  )


def merge_encoder(
    variables: Mapping[str, Any],
    encoder_variables: Mapping[str, Any],
    encoder_name: str = "encoder",
) -> dict[str, Any]:
  """Copies loaded encoder weights into a full UNet variables dict.

  Args:
    variables: the UNet's {'params': ..., 'batch_stats': ...}.
    encoder_variables: e.g. the output of `load_resnet50`, laid out like the
      UNet's encoder subtree.
    encoder_name: name of the encoder submodule inside the UNet.

  Returns:
    A new variables dict (the input is not modified) where every leaf of
    `encoder_variables` replaces the matching leaf under `encoder_name`, cast to
    the model leaf's dtype. Encoder leaves absent from `encoder_variables`
    (e.g. scSE parameters) keep their values.

  Raises:
    ValueError: naming the key if a loaded leaf has no counterpart in the model
      or a different shape.
  """
  # unfreeze copies the dict structure, so the caller's dict is not touched.
  merged = flax.core.unfreeze(variables)
  for collection, tree in flax.core.unfreeze(encoder_variables).items():
    if collection not in merged or encoder_name not in merged[collection]:
      raise ValueError(
          f"model variables have no '{collection}/{encoder_name}'"
          " subtree to load the encoder into."
      )
    target = traverse_util.flatten_dict(merged[collection][encoder_name])
    for path, value in traverse_util.flatten_dict(tree).items():
      name = "/".join((collection, encoder_name) + path)
      if path not in target:
        raise ValueError(f"pretrained leaf {name} does not exist in the model.")
      old = target[path]
      if tuple(np.shape(value)) != tuple(np.shape(old)):
        raise ValueError(
            f"pretrained leaf {name} has shape "
            f"{tuple(np.shape(value))}, the model has "
            f"{tuple(np.shape(old))}."
        )
      target[path] = jnp.asarray(value, dtype=old.dtype)
    merged[collection][encoder_name] = traverse_util.unflatten_dict(target)
  return merged

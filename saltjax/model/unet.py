"""U-Net with a ResNet50 encoder and scSE attention, in flax.linen.

The encoder reproduces torchvision's ResNet50 (v1.5) layer for layer, with
explicit symmetric padding, so that torchvision or timm ImageNet weights
(loaded by `saltjax.model.pretrained`) produce torchvision's activations. The decoder
follows segmentation_models_pytorch's
`Unet('resnet50', decoder_attention_type='scse')`.

All modules take NHWC inputs. `dtype` is the computation dtype; parameters are
always float32 and the model outputs are always float32.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = Any
Dtype = Any

# ImageNet statistics. A gray image (in_channels=1) is normalised with one mean
# and std, the means of the RGB ones; pretrained.fold_gray_stem folds the
# per-channel RGB statistics into the 1-channel stem kernel and bn1's running
# mean, so pretrained weights see what the RGB stem sees for the gray image
# repeated to RGB. Trained from scratch, the gray input is simply centred.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
IMAGENET_MEAN_GRAY = 0.449
IMAGENET_STD_GRAY = 0.226

UPSAMPLE_METHODS = ("nearest", "bilinear")

# flax's momentum 0.9 is torch's momentum 0.1: running = 0.9 * running + 0.1 *
# batch. Every BatchNorm of the model uses it (swa.recompute_batch_stats
# relies on that to read a batch's statistics off one update).
BATCH_NORM_MOMENTUM = 0.9

# torchvision initialises ResNet convs with kaiming_normal(fan_out, relu);
# smp initialises decoder convs with kaiming_uniform(fan_in, relu) and the
# head with xavier_uniform.
_encoder_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_decoder_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
_head_init = nn.initializers.xavier_uniform()


def _pad(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Torch-style symmetric padding for an odd kernel.

  flax's 'SAME' pads stride-2 convs asymmetrically (more at the end), which
  shifts the sampling grid by one pixel against torch's padding=k//2, and
  pretrained torch weights would then see different windows.
  """
  p = kernel_size // 2
  return ((p, p), (p, p))


def _resize(x: Array, height: int, width: int, method: str) -> Array:
  """Resizes NHWC `x` to (height, width) with 'nearest' or 'bilinear'."""
  in_h, in_w = x.shape[1], x.shape[2]
  if (in_h, in_w) == (height, width):
    return x
  if method == "nearest" and height % in_h == 0 and width % in_w == 0:
    # An exact integer nearest upsample is a repeat; it avoids a gather whose
    # gradient is a slow scatter-add on accelerators.
    x = jnp.repeat(x, height // in_h, axis=1)
    return jnp.repeat(x, width // in_w, axis=2)
  # antialias=False matches torch's F.interpolate(align_corners=False).
  return jax.image.resize(
      x, (x.shape[0], height, width, x.shape[3]), method=method, antialias=False
  )


def count_params(params: Any) -> int:
  """Number of scalars in a pytree of arrays (or jax.ShapeDtypeStructs)."""
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))


class ScSE(nn.Module):
  """Concurrent spatial and channel squeeze & excitation (Roy et al. 2018).

  Same as segmentation_models_pytorch's SCSEModule:
  out = x * cSE(x) + x * sSE(x), where cSE is global-average-pool -> 1x1 conv
  (C -> C // reduction) -> ReLU -> 1x1 conv (-> C) -> sigmoid, and sSE is a 1x1
  conv (C -> 1) -> sigmoid. All convs have biases.

  With `identity_init` the last conv of each gate (`cse_expand`, `sse`)
  starts at zero, so both gates start at sigmoid(0) = 0.5 and the module
  starts as the identity: x * 0.5 + x * 0.5 = x. The gates still get
  gradients at once (they are the outputs of those convs), so attention is
  learnt from there, as zero-initialised residual branches are.

  Attributes:
    reduction: channel reduction of the cSE bottleneck.
    dtype: computation dtype.
    kernel_init: initialiser of the convs (of `cse_reduce` only when
      `identity_init`).
    identity_init: start as the identity (zero-initialised gate convs).
  """

  reduction: int = 16
  dtype: Dtype = jnp.float32
  kernel_init: Callable[..., Array] = _decoder_conv_init
  identity_init: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    # A reduction larger than the width would leave no bottleneck channel.
    hidden = max(channels // self.reduction, 1)
    dense = functools.partial(
        nn.Conv,
        kernel_size=(1, 1),
        use_bias=True,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=self.kernel_init,
        bias_init=nn.initializers.zeros_init(),
    )
    # Average in float32: a bf16 sum over a large map loses precision.
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    gate_init = nn.initializers.zeros_init() if self.identity_init else self.kernel_init
    c = dense(hidden, name="cse_reduce")(pooled)
    c = nn.relu(c)
    c = dense(channels, kernel_init=gate_init, name="cse_expand")(c)
    c = nn.sigmoid(c)
    s = nn.sigmoid(dense(1, kernel_init=gate_init, name="sse")(x))
    return (x * c + x * s).astype(self.dtype)


class BottleneckBlock(nn.Module):
  """torchvision's Bottleneck (ResNet v1.5: the stride sits on the 3x3 conv).

  Attributes:
    filters: width of the 1x1 and 3x3 convs; the block outputs 4 * filters.
    strides: stride of the 3x3 conv and of the projection shortcut.
    downsample: whether to use a projection shortcut (1x1 conv + BN).
    scse: whether to apply scSE to the residual branch before the addition.
    scse_reduction: scSE channel reduction.
    dtype: computation dtype.
  """

  filters: int
  strides: int = 1
  downsample: bool = False
  scse: bool = False
  scse_reduction: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    conv = functools.partial(
        nn.Conv,
        use_bias=False,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=_encoder_conv_init,
    )
    # Statistics are kept in float32.
    norm = functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=BATCH_NORM_MOMENTUM,
        epsilon=1e-5,
        dtype=self.dtype,
        param_dtype=jnp.float32,
    )

    residual = x
    y = conv(self.filters, (1, 1), padding=_pad(1), name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(
        self.filters, (3, 3), strides=(self.strides, self.strides), padding=_pad(3), name="conv2"
    )(y)
    y = nn.relu(norm(name="bn2")(y))
    y = conv(4 * self.filters, (1, 1), padding=_pad(1), name="conv3")(y)
    y = norm(name="bn3")(y)
    if self.scse:
      # Inserted into a (pretrained) ResNet, the block must start as the block
      # without it: with torchvision's fan-out init the C -> 1 spatial conv
      # has weights of std sqrt(2), its logits an std of ~sqrt(2C) (~23 at
      # C=256), so most gates would sit at 0 or 1, masking the pretrained
      # residual branch at random with near-zero gradients. Hence an identity
      # start (zero gate convs); the cSE bottleneck keeps the encoder's init.
      y = ScSE(
          reduction=self.scse_reduction,
          dtype=self.dtype,
          kernel_init=_encoder_conv_init,
          identity_init=True,
          name="scse",
      )(y)
    if self.downsample:
      residual = conv(
          4 * self.filters,
          (1, 1),
          strides=(self.strides, self.strides),
          padding=_pad(1),
          name="downsample_conv",
      )(x)
      residual = norm(name="downsample_bn")(residual)
    return nn.relu(y + residual)


class ResNetEncoder(nn.Module):
  """Bottleneck ResNet in torchvision's layout, returning multi-scale features.

  Submodules are named after torchvision's state-dict keys: `conv1`, `bn1`,
  `layer{i}_{j}` (torchvision `layer{i}.{j}`), and within a block `conv1..3`,
  `bn1..3`, `downsample_conv` / `downsample_bn` (torchvision `downsample.0/.1`).

  Attributes:
    stage_sizes: number of bottleneck blocks per stage ((3, 4, 6, 3) for
      ResNet50).
    num_filters: stem width; stage i has bottleneck width num_filters * 2**i.
    scse: whether to put scSE on the residual branch of every block.
    scse_reduction: scSE channel reduction.
    dtype: computation dtype.
  """

  stage_sizes: Sequence[int]
  num_filters: int = 64
  scse: bool = False
  scse_reduction: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> list[Array]:
    """Returns [stem, layer1, ..., layerN] at strides 2, 4, 8, 16, 32, ...."""
    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(
        self.num_filters,
        (7, 7),
        strides=(2, 2),
        padding=_pad(7),
        use_bias=False,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=_encoder_conv_init,
        name="conv1",
    )(x)
    x = nn.BatchNorm(
        use_running_average=not train,
        momentum=BATCH_NORM_MOMENTUM,
        epsilon=1e-5,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name="bn1",
    )(x)
    x = nn.relu(x)
    features = [x]
    # flax pads max_pool with -inf, like torch.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        # torchvision: layer1 keeps the resolution (after the max pool), every
        # later stage halves it in its first block.
        strides = 2 if i > 0 and j == 0 else 1
        x = BottleneckBlock(
            filters=self.num_filters * 2**i,
            strides=strides,
            downsample=(j == 0),
            scse=self.scse,
            scse_reduction=self.scse_reduction,
            dtype=self.dtype,
            name=f"layer{i + 1}_{j}",
        )(x, train=train)
      features.append(x)
    return features


ResNet50Encoder = functools.partial(ResNetEncoder, stage_sizes=(3, 4, 6, 3))


class DecoderBlock(nn.Module):
  """smp's U-Net decoder block: upsample, concat skip, scSE, 2x conv-BN-ReLU.

  Attributes:
    features: output channels.
    scse: whether to apply scSE to the concatenated input and to the output.
    scse_reduction: scSE channel reduction.
    upsample: 'nearest' or 'bilinear'.
    dtype: computation dtype.
  """

  features: int
  scse: bool = True
  scse_reduction: int = 16
  upsample: str = "nearest"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, skip: Optional[Array], train: bool = False) -> Array:
    if skip is not None:
      x = _resize(x, skip.shape[1], skip.shape[2], self.upsample)
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
      # As in smp, the input scSE only runs where there is a skip; smp's last
      # block builds it but never calls it, so it has no parameters here.
      # The decoder keeps smp's init (no identity start): it is trained from
      # scratch, there are no pretrained features to preserve, and the
      # fan-in init gives gate logits of std ~sqrt(2) * rms(x), unsaturated.
      if self.scse:
        x = ScSE(self.scse_reduction, dtype=self.dtype, name="scse_in")(x)
    else:
      x = _resize(x, 2 * x.shape[1], 2 * x.shape[2], self.upsample)
    for k in (1, 2):
      x = nn.Conv(
          self.features,
          (3, 3),
          padding=_pad(3),
          use_bias=False,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          kernel_init=_decoder_conv_init,
          name=f"conv{k}",
      )(x)
      x = nn.BatchNorm(
          use_running_average=not train,
          momentum=BATCH_NORM_MOMENTUM,
          epsilon=1e-5,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          name=f"bn{k}",
      )(x)
      x = nn.relu(x)
    if self.scse:
      x = ScSE(self.scse_reduction, dtype=self.dtype, name="scse_out")(x)
    return x


class UNet(nn.Module):
  """U-Net with a (scSE-)ResNet encoder and an smp-style scSE decoder.

  Input: images in [0, 1], shape (B, H, W) or (B, H, W, C) with C == 1 or
  C == in_channels. The images are normalised with ImageNet statistics inside
  the model so that pretrained encoder weights see what they were trained on.

  Output: a dict with 'logits' (B, H, W) float32, and 'side_logits' (list of
  (B, H, W)) if deep_supervision, 'class_logits' (B,) if classifier.

  Attributes:
    stage_sizes: encoder blocks per stage.
    encoder_width: encoder stem width (64 for ResNet50).
    in_channels: 1 (gray stem) or 3 (the gray image is repeated to RGB).
    scse_encoder: scSE in every encoder bottleneck block.
    scse_decoder: scSE on the input and output of every decoder block.
    scse_reduction: scSE channel reduction.
    decoder_channels: output channels of the decoder blocks, deepest first;
      one per encoder feature map (len(stage_sizes) + 1).
    upsample: 'nearest' or 'bilinear' upsampling in the decoder.
    hypercolumn: concatenate all decoder outputs (upsampled to the final
      resolution) before the head.
    deep_supervision: emit a 1-channel side logit map per decoder block.
    classifier: emit an image-level "contains salt" logit from the pooled
      deepest encoder features.
    dtype: computation dtype (parameters are float32).
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  encoder_width: int = 64
  in_channels: int = 1
  scse_encoder: bool = True
  scse_decoder: bool = True
  scse_reduction: int = 16
  decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)
  upsample: str = "nearest"
  hypercolumn: bool = False
  deep_supervision: bool = False
  classifier: bool = False
  dtype: Dtype = jnp.float32

  def _normalize(self, x: Array) -> Array:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4:
      raise ValueError(f"UNet expects (B, H, W[, C]) images, got {x.shape}.")
    if self.in_channels == 1:
      if x.shape[-1] != 1:
        raise ValueError(f"in_channels=1 but the input has shape {x.shape}.")
      return (x - IMAGENET_MEAN_GRAY) / IMAGENET_STD_GRAY
    if self.in_channels == 3:
      if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
      if x.shape[-1] != 3:
        raise ValueError(f"in_channels=3 but the input has shape {x.shape}.")
      mean = jnp.asarray(IMAGENET_MEAN_RGB, jnp.float32)
      std = jnp.asarray(IMAGENET_STD_RGB, jnp.float32)
      return (x - mean) / std
    raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}.")

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Any]:
    height, width = x.shape[1], x.shape[2]
    if len(self.decoder_channels) != len(self.stage_sizes) + 1:
      raise ValueError(
          f"decoder_channels needs {len(self.stage_sizes) + 1} entries (one per"
          f" encoder feature map), got {tuple(self.decoder_channels)}."
      )
    if self.upsample not in UPSAMPLE_METHODS:
      raise ValueError(f"upsample must be one of {UPSAMPLE_METHODS}, got " f"{self.upsample!r}.")

    x = self._normalize(x).astype(self.dtype)
    # Named 'encoder' so that pretrained.merge_encoder finds it.
    features = ResNetEncoder(
        stage_sizes=tuple(self.stage_sizes),
        num_filters=self.encoder_width,
        scse=self.scse_encoder,
        scse_reduction=self.scse_reduction,
        dtype=self.dtype,
        name="encoder",
    )(x, train=train)

    # Deepest map first; skips are the shallower maps, the last block has none.
    y = features[-1]
    skips = list(reversed(features[:-1])) + [None]
    block_outputs = []
    for i, (channels, skip) in enumerate(zip(self.decoder_channels, skips)):
      y = DecoderBlock(
          features=channels,
          scse=self.scse_decoder,
          scse_reduction=self.scse_reduction,
          upsample=self.upsample,
          dtype=self.dtype,
          name=f"decoder_{i}",
      )(y, skip, train=train)
      block_outputs.append(y)

    head_in = y
    if self.hypercolumn:
      out_h, out_w = y.shape[1], y.shape[2]
      head_in = jnp.concatenate(
          [_resize(b, out_h, out_w, self.upsample) for b in block_outputs], axis=-1
      )
    logits = nn.Conv(
        1,
        (3, 3),
        padding=_pad(3),
        use_bias=True,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=_head_init,
        name="head",
    )(head_in)

    def to_input_size(z):
      # The decoder ends at 2x the stem's resolution, which differs from the
      # input size when it is not a multiple of 32 (e.g. 101 -> 102). Logits
      # are smooth maps, so bilinear is the natural resampling here.
      z = _resize(z.astype(jnp.float32), height, width, "bilinear")
      return z[..., 0]

    outputs = {"logits": to_input_size(logits)}
    if self.deep_supervision:
      outputs["side_logits"] = [
          to_input_size(
              nn.Conv(
                  1,
                  (1, 1),
                  use_bias=True,
                  dtype=self.dtype,
                  param_dtype=jnp.float32,
                  kernel_init=_head_init,
                  name=f"side_head_{i}",
              )(b)
          )
          for i, b in enumerate(block_outputs)
      ]
    if self.classifier:
      pooled = jnp.mean(features[-1].astype(jnp.float32), axis=(1, 2))
      class_logits = nn.Dense(1, dtype=self.dtype, param_dtype=jnp.float32, name="classifier")(
          pooled
      )
      outputs["class_logits"] = class_logits[:, 0].astype(jnp.float32)
    return outputs


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_MODEL_FIELDS = (
    "stage_sizes",
    "encoder_width",
    "in_channels",
    "scse_encoder",
    "scse_decoder",
    "scse_reduction",
    "decoder_channels",
    "upsample",
    "hypercolumn",
    "deep_supervision",
    "classifier",
    "dtype",
)


def resolve_dtype(dtype: Any) -> Dtype:
  """Maps 'auto' / 'float32' / 'bfloat16' (or a dtype) to a jnp dtype.

  'auto' is bfloat16 on GPU/TPU, whose matrix units run it at full speed, and
  float32 on CPU, where bfloat16 is emulated and slow.
  """
  if isinstance(dtype, str):
    if dtype == "auto":
      return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    if dtype in _DTYPES:
      return _DTYPES[dtype]
  else:
    try:
      name = jnp.dtype(dtype).name
    except TypeError:
      name = None
    if name in _DTYPES:
      return _DTYPES[name]
  raise ValueError(f"model dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}.")


def create_model(model_config: Any, dtype: Any = None) -> UNet:
  """Builds a UNet from a config with the fields listed in _MODEL_FIELDS.

  Args:
    model_config: ml_collections.ConfigDict (or any object with attributes)
      holding stage_sizes, encoder_width, in_channels, scse_encoder,
      scse_decoder, scse_reduction, decoder_channels, upsample, hypercolumn,
      deep_supervision, classifier and dtype.
    dtype: if given, overrides model_config.dtype ('auto', 'float32',
      'bfloat16' or a jnp dtype).

  Returns:
    The (uninitialised) UNet module.

  Raises:
    ValueError: naming the offending option.
  """
  missing = [f for f in _MODEL_FIELDS if not hasattr(model_config, f)]
  if missing:
    raise ValueError(f'model config lacks field(s): {", ".join(missing)}.')
  cfg = {f: getattr(model_config, f) for f in _MODEL_FIELDS}

  stage_sizes = tuple(int(s) for s in cfg["stage_sizes"])
  if not stage_sizes or any(s <= 0 for s in stage_sizes):
    raise ValueError(
        "model.stage_sizes must be a non-empty list of positive "
        f'ints, got {cfg["stage_sizes"]!r}.'
    )
  decoder_channels = tuple(int(c) for c in cfg["decoder_channels"])
  if any(c <= 0 for c in decoder_channels):
    raise ValueError(
        "model.decoder_channels must be positive, got " f'{cfg["decoder_channels"]!r}.'
    )
  if len(decoder_channels) != len(stage_sizes) + 1:
    raise ValueError(
        f"model.decoder_channels needs len(stage_sizes) + 1 = "
        f'{len(stage_sizes) + 1} entries, got {cfg["decoder_channels"]!r}.'
    )
  for name in ("encoder_width", "scse_reduction"):
    if int(cfg[name]) <= 0:
      raise ValueError(f"model.{name} must be positive, got {cfg[name]!r}.")
  if int(cfg["in_channels"]) not in (1, 3):
    raise ValueError(f'model.in_channels must be 1 or 3, got {cfg["in_channels"]!r}.')
  if cfg["upsample"] not in UPSAMPLE_METHODS:
    raise ValueError(
        f"model.upsample must be one of {UPSAMPLE_METHODS}, got " f'{cfg["upsample"]!r}.'
    )
  try:
    compute_dtype = resolve_dtype(cfg["dtype"] if dtype is None else dtype)
  except ValueError as e:
    raise ValueError(f"model.dtype: {e}") from None

  return UNet(
      stage_sizes=stage_sizes,
      encoder_width=int(cfg["encoder_width"]),
      in_channels=int(cfg["in_channels"]),
      scse_encoder=bool(cfg["scse_encoder"]),
      scse_decoder=bool(cfg["scse_decoder"]),
      scse_reduction=int(cfg["scse_reduction"]),
      decoder_channels=decoder_channels,
      upsample=cfg["upsample"],
      hypercolumn=bool(cfg["hypercolumn"]),
      deep_supervision=bool(cfg["deep_supervision"]),
      classifier=bool(cfg["classifier"]),
      dtype=compute_dtype,
  )


# Jitted with the model as a static argument: modules are frozen dataclasses,
# equal (and hashed) by their fields, so a process that sets up the same model
# again (the pseudo-label round, prediction after training) reuses the traced
# init instead of tracing it again.
@functools.partial(jax.jit, static_argnames=("model", "image_size"))
def initialized(key: jax.Array, model: nn.Module, image_size: int) -> dict:
  """{params, batch_stats} of `model` for (1, image_size, image_size, 1) input."""
  dummy = jnp.zeros((1, image_size, image_size, 1), jnp.float32)
  variables = model.init({"params": key}, dummy, train=False)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

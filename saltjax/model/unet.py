"""U-Net with a ResNet50 encoder and scSE attention, in flax.linen.

The encoder (`saltjax.model.resnet`) reproduces torchvision's ResNet50 (v1.5)
layer for layer, so that torchvision or timm ImageNet weights (loaded by
`saltjax.model.pretrained`) produce torchvision's activations; its blocks and
scSE are in `saltjax.model.layers`. The decoder follows
segmentation_models_pytorch's `Unet('resnet50', decoder_attention_type='scse')`.
This module also builds the model from a config (`create_model`) and its
initial variables (`initialized`).

All modules take NHWC inputs. `dtype` is the computation dtype; parameters are
always float32 and the model outputs are always float32.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from saltjax.model import layers
from saltjax.model import resnet
from saltjax.model import space_to_depth

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
# How the last decoder block and the head are computed: on the full-resolution
# map, or on its 2x2 space-to-depth form (saltjax/model/space_to_depth.py: the
# same parameters and outputs, fewer padded lanes on a TPU); 'auto' picks
# space_to_depth on TPUs where the model allows it, plain elsewhere.
FINAL_BLOCKS = ("auto", "plain", "space_to_depth")


def count_params(params: Any) -> int:
  """Number of scalars in a pytree of arrays (or jax.ShapeDtypeStructs)."""
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))


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
      x = layers.resize(x, skip.shape[1], skip.shape[2], self.upsample)
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
      # As in smp, the input scSE only runs where there is a skip; smp's last
      # block builds it but never calls it, so it has no parameters here.
      # The decoder keeps smp's init (no identity start): it is trained from
      # scratch, there are no pretrained features to preserve, and the
      # fan-in init gives gate logits of std ~sqrt(2) * rms(x), unsaturated.
      if self.scse:
        x = layers.ScSE(self.scse_reduction, dtype=self.dtype, name="scse_in")(x)
    else:
      x = layers.resize(x, 2 * x.shape[1], 2 * x.shape[2], self.upsample)
    for k in (1, 2):
      x = layers.Conv(
          self.features,
          (3, 3),
          padding=layers.torch_padding(3),
          use_bias=False,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          kernel_init=layers.decoder_conv_init,
          name=f"conv{k}",
      )(x)
      x = nn.BatchNorm(
          use_running_average=not train,
          momentum=layers.BATCH_NORM_MOMENTUM,
          epsilon=1e-5,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          name=f"bn{k}",
      )(x)
      x = nn.relu(x)
    if self.scse:
      x = layers.ScSE(self.scse_reduction, dtype=self.dtype, name="scse_out")(x)
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
    final_block: 'plain' or 'space_to_depth' (the last decoder block and the
      head on 2x2-packed maps; needs nearest upsampling, no hypercolumn).
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
  final_block: str = "plain"
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

  def _decode(self, features: Sequence[Array], train: bool) -> list[Array]:
    """Each decoder block's output, coarsest first (the last is the finest).

    With final_block='space_to_depth' the last output is packed
    (space_to_depth.unpack gives the full-resolution map).
    """
    # Deepest map first; skips are the shallower maps, the last block has none.
    y = features[-1]
    skips = list(reversed(features[:-1])) + [None]
    block_outputs = []
    for i, (channels, skip) in enumerate(zip(self.decoder_channels, skips)):
      if skip is None and self.final_block == "space_to_depth":
        y = space_to_depth.DecoderBlock(
            features=channels,
            scse=self.scse_decoder,
            scse_reduction=self.scse_reduction,
            dtype=self.dtype,
            name=f"decoder_{i}",
        )(y, train=train)
        block_outputs.append(y)
        continue
      y = DecoderBlock(
          features=channels,
          scse=self.scse_decoder,
          scse_reduction=self.scse_reduction,
          upsample=self.upsample,
          dtype=self.dtype,
          name=f"decoder_{i}",
      )(y, skip, train=train)
      block_outputs.append(y)
    return block_outputs

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
    _check_final_block(self.final_block, self.upsample, self.hypercolumn)

    x = self._normalize(x).astype(self.dtype)
    # Named 'encoder' so that pretrained.merge_encoder finds it.
    features = resnet.ResNetEncoder(
        stage_sizes=tuple(self.stage_sizes),
        num_filters=self.encoder_width,
        scse=self.scse_encoder,
        scse_reduction=self.scse_reduction,
        dtype=self.dtype,
        name="encoder",
    )(x, train=train)

    block_outputs = self._decode(features, train)
    y = block_outputs[-1]

    if self.final_block == "space_to_depth":
      logits = space_to_depth.unpack(
          space_to_depth.Conv(
              1, use_bias=True, dtype=self.dtype, kernel_init=layers.head_init, name="head"
          )(y)
      )
      block_outputs[-1] = space_to_depth.unpack(y)  # for the side heads, if any
    else:
      head_in = y
      if self.hypercolumn:
        out_h, out_w = y.shape[1], y.shape[2]
        head_in = jnp.concatenate(
            [layers.resize(b, out_h, out_w, self.upsample) for b in block_outputs], axis=-1
        )
      logits = layers.Conv(
          1,
          (3, 3),
          padding=layers.torch_padding(3),
          use_bias=True,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          kernel_init=layers.head_init,
          name="head",
      )(head_in)

    def to_input_size(z):
      # The decoder ends at 2x the stem's resolution, which differs from the
      # input size when it is not a multiple of 32 (e.g. 101 -> 102). Logits
      # are smooth maps, so bilinear is the natural resampling here.
      z = layers.resize(z.astype(jnp.float32), height, width, "bilinear")
      return z[..., 0]

    outputs = {"logits": to_input_size(logits)}
    if self.deep_supervision:
      outputs["side_logits"] = [
          to_input_size(
              layers.Conv(
                  1,
                  (1, 1),
                  use_bias=True,
                  dtype=self.dtype,
                  param_dtype=jnp.float32,
                  kernel_init=layers.head_init,
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


def space_to_depth_allowed(upsample: str, hypercolumn: bool) -> bool:
  """Whether the last block can be folded: it is the nearest 2x upsample's, with no hypercolumn."""
  return upsample == "nearest" and not hypercolumn


def _check_final_block(final_block: str, upsample: str, hypercolumn: bool) -> None:
  if final_block not in FINAL_BLOCKS[1:]:
    raise ValueError(f"final_block must be 'plain' or 'space_to_depth', got {final_block!r}.")
  if final_block == "space_to_depth" and not space_to_depth_allowed(upsample, hypercolumn):
    raise ValueError(
        "final_block='space_to_depth' needs upsample='nearest' and hypercolumn=False (the"
        f" packed block is the nearest 2x upsample's), got upsample={upsample!r},"
        f" hypercolumn={hypercolumn!r}."
    )


def resolve_final_block(final_block: str, upsample: str, hypercolumn: bool, platform: str) -> str:
  """'auto' -> 'space_to_depth' on a TPU where the model allows it, else 'plain'.

  A TPU pads a map's channels to its 128 lanes, and the last block's 16 are its
  costliest there (saltjax/model/space_to_depth.py); a CPU, bound by
  arithmetic, runs the plain block faster; on GPUs it is unmeasured.
  """
  if final_block == "auto":
    allowed = space_to_depth_allowed(upsample, hypercolumn)
    return "space_to_depth" if platform == "tpu" and allowed else "plain"
  return final_block


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


def create_model(model_config: Any, dtype: Any = None, platform: Optional[str] = None) -> UNet:
  """Builds a UNet from a config with the fields listed in _MODEL_FIELDS.

  Args:
    model_config: ml_collections.ConfigDict (or any object with attributes)
      holding stage_sizes, encoder_width, in_channels, scse_encoder,
      scse_decoder, scse_reduction, decoder_channels, upsample, hypercolumn,
      deep_supervision, classifier and dtype, and optionally final_block
      (FINAL_BLOCKS; 'auto' where absent, as in configs written before it).
    dtype: if given, overrides model_config.dtype ('auto', 'float32',
      'bfloat16' or a jnp dtype).
    platform: the platform the model is built for ('cpu', 'gpu', 'tpu'),
      which decides final_block='auto'; default: JAX's default backend.

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
  final_block = getattr(model_config, "final_block", "auto")
  if final_block not in FINAL_BLOCKS:
    raise ValueError(f"model.final_block must be one of {FINAL_BLOCKS}, got {final_block!r}.")
  final_block = resolve_final_block(
      final_block, cfg["upsample"], bool(cfg["hypercolumn"]), platform or jax.default_backend()
  )
  try:
    _check_final_block(final_block, cfg["upsample"], bool(cfg["hypercolumn"]))
  except ValueError as e:
    raise ValueError(f"model.{e}") from None

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
      final_block=final_block,
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

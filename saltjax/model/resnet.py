"""The U-Net's encoder: torchvision's ResNet (v1.5, bottleneck blocks), optionally
with scSE on every block's residual branch, in flax.linen.

It reproduces torchvision's ResNet50 layer for layer, with explicit symmetric
padding, so that torchvision or timm ImageNet weights (loaded by
`saltjax.model.pretrained`) produce torchvision's activations.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from flax import linen as nn
import jax.numpy as jnp

from saltjax.model import layers

Array = Any
Dtype = Any


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
        layers.Conv,
        use_bias=False,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=layers.encoder_conv_init,
    )
    # Statistics are kept in float32.
    norm = functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=layers.BATCH_NORM_MOMENTUM,
        epsilon=1e-5,
        dtype=self.dtype,
        param_dtype=jnp.float32,
    )

    residual = x
    y = conv(self.filters, (1, 1), padding=layers.torch_padding(1), name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(
        self.filters,
        (3, 3),
        strides=(self.strides, self.strides),
        padding=layers.torch_padding(3),
        name="conv2",
    )(y)
    y = nn.relu(norm(name="bn2")(y))
    y = conv(4 * self.filters, (1, 1), padding=layers.torch_padding(1), name="conv3")(y)
    y = norm(name="bn3")(y)
    if self.scse:
      # Inserted into a (pretrained) ResNet, the block must start as the block
      # without it: with torchvision's fan-out init the C -> 1 spatial conv
      # has weights of std sqrt(2), its logits an std of ~sqrt(2C) (~23 at
      # C=256), so most gates would sit at 0 or 1, masking the pretrained
      # residual branch at random with near-zero gradients. Hence an identity
      # start (zero gate convs); the cSE bottleneck keeps the encoder's init.
      y = layers.ScSE(
          reduction=self.scse_reduction,
          dtype=self.dtype,
          kernel_init=layers.encoder_conv_init,
          identity_init=True,
          name="scse",
      )(y)
    if self.downsample:
      residual = conv(
          4 * self.filters,
          (1, 1),
          strides=(self.strides, self.strides),
          padding=layers.torch_padding(1),
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
    x = layers.Conv(
        self.num_filters,
        (7, 7),
        strides=(2, 2),
        padding=layers.torch_padding(7),
        use_bias=False,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=layers.encoder_conv_init,
        name="conv1",
    )(x)
    x = nn.BatchNorm(
        use_running_average=not train,
        momentum=layers.BATCH_NORM_MOMENTUM,
        epsilon=1e-5,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name="bn1",
    )(x)
    x = nn.relu(x)
    features = [x]
    # flax pads max_pool with -inf, like torch.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=layers.torch_padding(3))
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

"""The U-Net's last decoder block and head computed on 2x2 space-to-depth maps.

The last decoder block works at the output's full resolution with the
fewest channels (16 for the recipe): a (B, 128, 128, 16) map. A TPU moves
and computes arrays in tiles of 8 x 128 elements over their two most minor
dimensions, so a 16-channel map is padded to 128 lanes (or, where XLA puts
the batch in the lanes instead, 32 images a chip to 128): compiled for a
v5e at 32 images a chip, this block and the head were a third of the train
step's estimated time and most of its padded traffic
(benchmarks/README.md).

Here the same block is computed on the map folded 2x2 into its channels,
(B, 64, 64, 4 x 16), each pixel of the half-resolution map holding its four
full-resolution pixels (`pack`, `unpack`; phases row-major, then channels):

- a 3x3 convolution (padding 1) of the full-resolution map is a 3x3
  convolution of the packed map with a kernel built from the same weights
  (`packed_kernel`): each output phase reads, from the packed neighbours
  around it, the input phases its 3x3 window covers;
- the block's nearest 2x upsample followed by its first convolution is a
  3x3 convolution of the half-resolution input itself, each phase's taps
  that fall on the same input pixel summed (the upsampled map is never
  made, nor, in the backward pass, summed back);
- BatchNorm's statistics per channel are the mean over the four phases of
  each phase's statistics; scSE's channel gate pools over every phase, its
  spatial gate is one 1x1 convolution per phase, its logit repeated over
  the phase's channels by the same convolution.

Every parameter and BatchNorm statistic is the full-resolution block's, with
the same names and shapes (and the same initial values, which flax derives
from the names): a checkpoint runs either way. The outputs are the same to
rounding: the kernel sums change the order of the additions. The packed
convolutions do 2x (the upsampling one) and 4x (the others) the
multiply-adds, with zeros, which is why it is the default on TPUs only
(`model.final_block='auto'`): a CPU, bound by arithmetic, runs the plain
block faster.
"""

from __future__ import annotations

import functools
from typing import Any

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from saltjax.model import convolution
from saltjax.model import layers

Array = Any
Dtype = Any

PHASES = 4  # a 2 x 2 block of full-resolution pixels per packed pixel


def pack(x: Array) -> Array:
  """(B, 2h, 2w, C) -> (B, h, w, 4C): each 2x2 block of pixels into the channels."""
  b, height, width, c = x.shape
  x = x.reshape(b, height // 2, 2, width // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height // 2, width // 2, PHASES * c)


def unpack(x: Array) -> Array:
  """(B, h, w, 4C) -> (B, 2h, 2w, C): `pack`'s inverse."""
  b, h, w, packed = x.shape
  c = packed // PHASES
  x = x.reshape(b, h, w, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, 2 * h, 2 * w, c)


def _taps() -> np.ndarray:
  """T[d + 1, i, o, k + 1] = 1 where output phase o reads, at packed offset d, input phase i
  through the full-resolution kernel tap k (offsets along one axis, all in -1..1).

  Output pixel 2y + o reads full-resolution pixel 2y + o + k, which is pixel
  y + d of the packed map, phase i, for 2d + i = o + k.
  """
  taps = np.zeros((3, 2, 2, 3), np.float32)
  for d in (-1, 0, 1):
    for i in (0, 1):
      for o in (0, 1):
        k = 2 * d + i - o
        if -1 <= k <= 1:
          taps[d + 1, i, o, k + 1] = 1.0
  return taps


_TAPS = _taps()


def packed_kernel(kernel: Array, upsampled_input: bool = False) -> Array:
  """A 3x3 kernel (3, 3, I, O) of a full-resolution convolution, for the packed maps.

  Returns the (3, 3, 4I, 4O) kernel that convolves packed maps as `kernel`
  convolves full-resolution ones (both with padding 1), or, with
  `upsampled_input`, the (3, 3, I, 4O) kernel that convolves a half-resolution
  map to the packed result of `kernel` on its nearest 2x upsample.
  """
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f"packed_kernel takes 3x3 kernels, got {kernel.shape}.")
  i, o = kernel.shape[2], kernel.shape[3]
  if upsampled_input:  # every input phase is the same pixel: their taps add up
    taps = _TAPS.sum(axis=1)
    return jnp.einsum("yak,xbl,klio->yxiabo", taps, taps, kernel).reshape(3, 3, i, PHASES * o)
  k = jnp.einsum("yAak,xBbl,klio->yxABiabo", _TAPS, _TAPS, kernel)
  return k.reshape(3, 3, PHASES * i, PHASES * o)


class Conv(nn.Module):
  """A 3x3 convolution (padding 1) of packed maps: flax.linen.Conv's parameters
  (`kernel` (3, 3, I, O), `bias` (O,)) as the full-resolution one has them.

  Attributes:
    features: O, output channels per phase.
    use_bias: add a bias (the same for every phase).
    upsampled_input: the input is the half-resolution map whose nearest 2x
      upsample the full-resolution convolution would see.
  """

  features: int
  use_bias: bool = False
  upsampled_input: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Any = layers.decoder_conv_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1] if self.upsampled_input else x.shape[-1] // PHASES
    kernel = self.param("kernel", self.kernel_init, (3, 3, channels, self.features), jnp.float32)
    # The kernel is built in float32, then cast: the summed taps round once.
    k = packed_kernel(kernel, self.upsampled_input).astype(self.dtype)
    y = convolution.conv_general_dilated(
        x.astype(self.dtype),
        k,
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
      y = y + jnp.tile(bias, PHASES).astype(self.dtype)
    return y


class BatchNorm(nn.Module):
  """flax.linen.BatchNorm of the full-resolution map, on its packed form.

  Its statistics per channel are over the batch, the pixels and the four
  phases; the parameters (`scale`, `bias`) and running statistics (`mean`,
  `var`) are flax's, with its float32 statistics, fast variance and momentum.
  """

  use_running_average: bool = False
  momentum: float = layers.BATCH_NORM_MOMENTUM
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1] // PHASES
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      xf = x.astype(jnp.promote_types(self.dtype, jnp.float32))
      per_phase = lambda v: v.mean(axis=(0, 1, 2)).reshape(PHASES, c).mean(axis=0)
      mean = per_phase(xf)
      var = jnp.maximum(0.0, per_phase(xf * xf) - mean * mean)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
    mul = jax.lax.rsqrt(var + self.epsilon) * scale
    tiled = lambda v: jnp.tile(v, PHASES)
    return jnp.asarray((x - tiled(mean)) * tiled(mul) + tiled(bias), self.dtype)


class SpatialGate(nn.Module):
  """scSE's spatial gate logits, a 1x1 convolution C -> 1 (`kernel`, `bias`), on each phase.

  Each phase's logit comes out repeated over that phase's C channels, (B, h, w, 4C),
  as the gate multiplies the map: one (4C, 4C) convolution, where a (4C, 4) one and
  a repeat made a 5-D broadcast, and its gradient a 5-D sum, that a TPU lays out badly.
  """

  dtype: Dtype = jnp.float32
  kernel_init: Any = layers.decoder_conv_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1] // PHASES
    kernel = self.param("kernel", self.kernel_init, (1, 1, c, 1), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (1,), jnp.float32)
    # Block-diagonal (4C, 4C): phase p's channels to its own logit, C times.
    repeated = kernel[0, 0] * jnp.ones((1, c), jnp.float32)
    k = jnp.kron(jnp.eye(PHASES, dtype=jnp.float32), repeated)[None, None]
    y = convolution.conv_general_dilated(
        x.astype(self.dtype),
        k.astype(self.dtype),
        (1, 1),
        ((0, 0), (0, 0)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + bias.astype(self.dtype)


class ScSE(nn.Module):
  """layers.ScSE of the full-resolution map, on its packed form (the same parameters)."""

  reduction: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, c = x.shape[0], x.shape[-1] // PHASES
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).reshape(b, PHASES, c).mean(axis=1)
    init = layers.decoder_conv_init
    gate = layers.channel_gate(pooled[:, None, None], self.reduction, self.dtype, init, init)
    spatial = nn.sigmoid(SpatialGate(self.dtype, name="sse")(x))
    return (x * jnp.tile(gate, PHASES) + x * spatial).astype(self.dtype)


class DecoderBlock(nn.Module):
  """unet.DecoderBlock without a skip (the last one, nearest upsampling), on packed maps.

  Takes the half-resolution input (B, h, w, C_in); returns the packed
  output (B, h, w, 4 x features), whose `unpack` is the plain block's output.
  """

  features: int
  scse: bool = True
  scse_reduction: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    x = Conv(self.features, upsampled_input=True, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    x = Conv(self.features, dtype=self.dtype, name="conv2")(x)
    x = nn.relu(norm(name="bn2")(x))
    if self.scse:
      x = ScSE(self.scse_reduction, dtype=self.dtype, name="scse_out")(x)
    return x

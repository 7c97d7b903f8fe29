"""The U-Net's building blocks shared by its encoder and decoder: the convolution,
scSE, torch-style padding, resizing, BatchNorm momentum and the initialisers.

All modules take NHWC inputs. `dtype` is the computation dtype; parameters are
always float32.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from flax import linen as nn
import jax
import jax.numpy as jnp

from saltjax.model import convolution

Array = Any
Dtype = Any

# flax's momentum 0.9 is torch's momentum 0.1: running = 0.9 * running + 0.1 *
# batch. Every BatchNorm of the model uses it (training.swa.recompute_batch_stats
# relies on that to read a batch's statistics off one update).
BATCH_NORM_MOMENTUM = 0.9

# torchvision initialises ResNet convs with kaiming_normal(fan_out, relu);
# smp initialises decoder convs with kaiming_uniform(fan_in, relu) and the
# head with xavier_uniform.
encoder_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
decoder_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
head_init = nn.initializers.xavier_uniform()

# Every convolution of the model: flax's, computing lax.conv_general_dilated,
# with a backward pass XLA's CPU backend runs fast inside loops (see
# saltjax/model/convolution.py); the parameters are flax.linen.Conv's.
Conv = functools.partial(nn.Conv, conv_general_dilated=convolution.conv_general_dilated)


def torch_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Torch-style symmetric padding for an odd kernel.

  flax's 'SAME' pads stride-2 convs asymmetrically (more at the end), which
  shifts the sampling grid by one pixel against torch's padding=k//2, and
  pretrained torch weights would then see different windows.
  """
  p = kernel_size // 2
  return ((p, p), (p, p))


def resize(x: Array, height: int, width: int, method: str) -> Array:
  """Resizes NHWC `x` to (height, width) with 'nearest' or 'bilinear'."""
  in_h, in_w = x.shape[1], x.shape[2]
  if (in_h, in_w) == (height, width):
    return x
  if method == "nearest" and height % in_h == 0 and width % in_w == 0:
    # An exact integer nearest upsample is a broadcast; it avoids a gather whose
    # gradient is a slow scatter-add on accelerators. One broadcast of both
    # axes makes one array (its gradient one sum), where a repeat per axis
    # made two.
    b, c = x.shape[0], x.shape[3]
    fy, fx = height // in_h, width // in_w
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, in_h, fy, in_w, fx, c))
    return x.reshape(b, height, width, c)
  # antialias=False matches torch's F.interpolate(align_corners=False).
  return jax.image.resize(
      x, (x.shape[0], height, width, x.shape[3]), method=method, antialias=False
  )


def _dense(features, dtype, kernel_init, name):
  """scSE's 1x1 convolutions (with biases, zero-initialised)."""
  return Conv(
      features,
      kernel_size=(1, 1),
      use_bias=True,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=kernel_init,
      bias_init=nn.initializers.zeros_init(),
      name=name,
  )


def channel_gate(pooled, reduction, dtype, kernel_init, gate_init) -> Array:
  """scSE's channel gate (B, 1, 1, C) from the map averaged over its pixels (B, 1, 1, C).

  Called inside a module's compact method: its convolutions (`cse_reduce`,
  `cse_expand`) are that module's.
  """
  channels = pooled.shape[-1]
  # A reduction larger than the width would leave no bottleneck channel.
  c = _dense(max(channels // reduction, 1), dtype, kernel_init, "cse_reduce")(pooled)
  c = _dense(channels, dtype, gate_init, "cse_expand")(nn.relu(c))
  return nn.sigmoid(c)


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
  kernel_init: Callable[..., Array] = decoder_conv_init
  identity_init: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    # Average in float32: a bf16 sum over a large map loses precision.
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    gate_init = nn.initializers.zeros_init() if self.identity_init else self.kernel_init
    c = channel_gate(pooled, self.reduction, self.dtype, self.kernel_init, gate_init)
    s = nn.sigmoid(_dense(1, self.dtype, gate_init, "sse")(x))
    return (x * c + x * s).astype(self.dtype)

"""The model's convolution: `lax.conv_general_dilated`, with a backward pass XLA's CPU backend runs fast in loops.

XLA's CPU backend runs a convolution with Eigen's kernels only when its
operands are laid out canonically (input NHWC, kernel HWIO, output NHWC);
any other convolution it emits as a plain loop nest, many times slower.
The backward pass of a canonical convolution is not canonical: JAX's
transpose rules give the input gradient a kernel with its input and output
features swapped (HWOI), and the kernel gradient the batch as features. The
CPU backend's canonicalization pass (`ConvCanonicalization`) transposes
them into canonical form, but it visits only the program's entry
computation: the convolutions of a loop body (the folds trained in turn,
`lax.map`; the device epoch's `lax.scan` over its steps) stay slow. On a
tiny in-turn train step this made the step 13 times slower than the same
folds vmapped at the top level.

Here, on CPU only (`lax.platform_dependent`), the convolution carries its
own backward pass made of canonical convolutions and explicit transposes:
the same arithmetic as JAX's transpose rules
(`jax._src.lax.convolution._conv_general_dilated_transpose_lhs/_rhs`),
laid out as the canonicalization pass would lay it out. Every other
platform (TPU, GPU) lowers `lax.conv_general_dilated` and JAX's own
gradient unchanged, so what XLA's TPU compiler sees is what it saw before.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax import lax

# flax.linen.Conv's dimension numbers for 2D inputs: NHWC, HWIO, NHWC.
_CANONICAL_2D = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
  """`lax.conv_general_dilated`'s signature and result (flax.linen.Conv's `conv_general_dilated`)."""
  plain = functools.partial(
      lax.conv_general_dilated,
      window_strides=window_strides,
      padding=padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
  )
  dnums = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if (
      dnums != _CANONICAL_2D  # other ranks' dimension numbers differ too
      or feature_group_count != 1
      or batch_group_count != 1
      or any(d != 1 for d in (lhs_dilation or ()))
      or preferred_element_type is not None
  ):
    return plain(lhs, rhs)  # not a case the canonical backward pass covers
  strides = tuple(int(s) for s in window_strides)
  dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
  if isinstance(padding, str):
    window = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation)]
    padding = lax.padtype_to_pads(lhs.shape[1:3], window, strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  canonical = functools.partial(_canonical_conv, strides, pads, dilation, precision)
  return lax.platform_dependent(lhs, rhs, cpu=canonical, default=plain)


def _conv(lhs, rhs, strides, pads, lhs_dilation, rhs_dilation, precision):
  """A canonical convolution: NHWC input, HWIO kernel, NHWC output."""
  return lax.conv_general_dilated(
      lhs,
      rhs,
      strides,
      pads,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=_CANONICAL_2D,
      precision=precision,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _canonical_conv(strides, pads, dilation, precision, x, w):
  return _conv(x, w, strides, pads, (1, 1), dilation, precision)


def _canonical_conv_fwd(strides, pads, dilation, precision, x, w):
  return _canonical_conv(strides, pads, dilation, precision, x, w), (x, w)


def _dilated(sizes, dilation):
  return np.array([0 if s == 0 else 1 + d * (s - 1) for s, d in zip(sizes, dilation)])


def _pairs(lo, hi):
  """Padding as lax takes it: (low, high) pairs of Python ints."""
  return tuple((int(a), int(b)) for a, b in zip(lo, hi))


def _canonical_conv_bwd(strides, pads, dilation, precision, residuals, g):
  x, w = residuals
  in_size = np.array(x.shape[1:3])
  window = _dilated(w.shape[:2], dilation)  # the kernel's extent, dilated
  out_size = _dilated(g.shape[1:3], strides)  # the output's extent, at input spacing
  lo = np.array([p[0] for p in pads])

  # Input gradient: g dilated by the strides, convolved with the kernel
  # flipped in space and with its features swapped, given as HWIO.
  lhs_lo = window - lo - 1
  lhs_hi = in_size + window - 1 - out_size - lhs_lo
  w_t = lax.rev(w, (0, 1)).transpose(0, 1, 3, 2)
  dx = _conv(g, w_t, (1, 1), _pairs(lhs_lo, lhs_hi), strides, dilation, precision)

  # Kernel gradient: the input with its channels as the batch (C, H, W, N),
  # convolved with g as the kernel (H', W', N, O) dilated by the strides,
  # gives (C, kh, kw, O), laid out as HWIO.
  rhs_hi = (out_size - in_size) + (window - lo - 1)
  dw = _conv(
      x.transpose(3, 1, 2, 0),
      g.transpose(1, 2, 0, 3),
      dilation,
      _pairs(lo, rhs_hi),
      (1, 1),
      strides,
      precision,
  ).transpose(1, 2, 0, 3)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)

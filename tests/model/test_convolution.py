"""The model's convolution: lax.conv_general_dilated's values and gradients, canonical inside loops on CPU.

The truth is independent of saltjax.model.convolution: JAX's own gradient of
lax.conv_general_dilated (its transpose rules), finite differences
(jax.test_util.check_grads), and the rule XLA's CPU backend applies to pick
its fast convolution kernels (input NHWC, kernel HWIO, output NHWC: the
dimension labels b01f_01io->b01f in the compiled program).
"""

from __future__ import annotations

import re

import jax
from jax import lax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from saltjax.model import convolution

NHWC = ("NHWC", "HWIO", "NHWC")

# (input height, kernel size, stride, padding, kernel dilation): the model's
# convolutions (3x3 and 1x1, stride 1 and 2, torch-style padding, the 7x7
# stem) and the rest of what flax.linen.Conv can ask for.
CASES = [
    (9, 3, 1, ((1, 1), (1, 1)), 1),
    (9, 3, 2, ((1, 1), (1, 1)), 1),
    (10, 3, 2, ((1, 1), (1, 1)), 1),
    (8, 1, 2, ((0, 0), (0, 0)), 1),
    (11, 7, 2, ((3, 3), (3, 3)), 1),
    (9, 3, 1, ((2, 2), (2, 2)), 2),
    (12, 3, 2, "SAME", 1),
    (12, 4, 3, ((0, 2), (1, 0)), 1),
    (7, 3, 1, "VALID", 1),
]


def _loss(conv, stride, padding, dilation):
  def loss(x, w):
    strides, dilations = (stride, stride), (dilation, dilation)
    y = conv(x, w, strides, padding, rhs_dilation=dilations, dimension_numbers=NHWC)
    return jnp.sum(jnp.sin(y))

  return loss


def _operands(rng, height, kernel, batch=(2,)):
  x = rng.normal(size=(*batch, height, height + 1, 3)).astype(np.float32)
  w = rng.normal(size=(*batch[:-1], kernel, kernel, 3, 5)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(w)


@pytest.mark.parametrize("height,kernel,stride,padding,dilation", CASES)
def test_values_and_gradients_are_lax_conv_general_dilateds(
    height, kernel, stride, padding, dilation
):
  x, w = _operands(np.random.default_rng(kernel * 10 + stride), height, kernel)
  ours = _loss(convolution.conv_general_dilated, stride, padding, dilation)
  theirs = _loss(lax.conv_general_dilated, stride, padding, dilation)
  assert float(jax.jit(ours)(x, w)) == pytest.approx(float(theirs(x, w)), rel=1e-6)
  got = jax.jit(jax.grad(ours, (0, 1)))(x, w)
  want = jax.grad(theirs, (0, 1))(x, w)
  for g, r in zip(got, want):
    assert g.shape == r.shape and g.dtype == r.dtype
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_gradients_match_finite_differences():
  x, w = _operands(np.random.default_rng(0), 6, 3)
  loss = _loss(convolution.conv_general_dilated, 2, ((1, 1), (1, 1)), 1)
  check_grads(loss, (x, w), order=1, modes=("rev",), atol=5e-2, rtol=5e-2, eps=1e-2)


def test_a_one_by_one_convolution_s_gradients_by_hand():
  # y[n, i, j, o] = sum_c x[n, i, j, c] w[c, o]; with L = sum(y * t):
  # dL/dx = t @ w.T, dL/dw = sum over n, i, j of x^T t.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
  w = rng.normal(size=(1, 1, 3, 5)).astype(np.float32)
  t = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  loss = lambda x, w: jnp.sum(
      convolution.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=NHWC) * t
  )
  dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w)
  np.testing.assert_allclose(dx, t @ w[0, 0].T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw[0, 0], np.einsum("nijc,nijo->co", x, t), rtol=1e-5, atol=1e-5)


def test_vmapped_folds_get_lax_conv_general_dilateds_gradients():
  x, w = _operands(np.random.default_rng(2), 9, 3, batch=(3, 2))
  grads = lambda conv: jax.vmap(jax.grad(_loss(conv, 2, ((1, 1), (1, 1)), 1), (0, 1)))
  got = jax.jit(grads(convolution.conv_general_dilated))(x, w)
  for g, r in zip(got, grads(lax.conv_general_dilated)(x, w)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def _scanned_gradients(conv):
  """Each fold's gradients, one fold after another in a lax.scan (as the folds in turn)."""
  loss = _loss(conv, 2, ((1, 1), (1, 1)), 1)
  return jax.jit(
      lambda x, w: lax.scan(lambda c, xw: (c, jax.grad(loss, (0, 1))(*xw)), 0, (x, w))[1]
  )


def test_inside_a_loop_every_convolution_is_canonical_on_cpu():
  x, w = _operands(np.random.default_rng(3), 9, 3, batch=(3, 2))
  program = _scanned_gradients(convolution.conv_general_dilated).lower(x, w).compile()
  labels = re.findall(r"convolution\(.*?dim_labels=([^,]+)", program.as_text())
  # The forward pass and both gradients: three convolutions, all canonical.
  assert len(labels) == 3 and set(labels) == {"b01f_01io->b01f"}, labels
  for g, r in zip(program(x, w), _scanned_gradients(lax.conv_general_dilated)(x, w)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_other_platforms_compute_lax_conv_general_dilated_and_its_own_gradient():
  x, w = _operands(np.random.default_rng(4), 9, 3)
  grads = lambda conv: jax.jit(jax.grad(_loss(conv, 2, ((1, 1), (1, 1)), 1), (0, 1)))
  for platform in ("tpu", "cuda"):
    text = lambda conv: grads(conv).trace(x, w).lower(lowering_platforms=(platform,)).as_text()
    ours, theirs = text(convolution.conv_general_dilated), text(lax.conv_general_dilated)
    # The same convolutions (dimension numbers included), and no transposes added.
    conv_ops = lambda t: re.findall(r"stablehlo\.convolution\(.*?(dim_numbers = .*?\})", t)
    assert conv_ops(ours) == conv_ops(theirs) and len(conv_ops(ours)) == 3
    assert "transpose" not in ours

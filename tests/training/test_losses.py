"""Tests for saltjax.training.losses, against hand computations and brute force."""

import itertools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saltjax.training import losses


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------
# Independent brute force for the Lovász hinge: explicit sets, python loops.
# ----------------------------------------------------------------------------


def _jaccard_set_loss(mispredicted, foreground):
  """Delta_J1(M) = |M| / |{y=1} u M| on explicit python sets (0 for M empty)."""
  if not mispredicted:
    return 0.0
  return len(mispredicted) / len(foreground | mispredicted)


def _hinge_values(logits, labels, activation):
  """m_i = activation(1 - x_i s_i), the paper's vector of errors."""
  values = []
  for x, y in zip(logits, labels):
    e = 1.0 - x * (2.0 * y - 1.0)
    if activation == "relu":
      values.append(max(e, 0.0))
    else:
      values.append(e + 1.0 if e > 0 else math.exp(e))
  return values


def _lovasz_extension_by_permutation(m, foreground):
  """sum_i m_pi(i) (Delta(pi(1..i)) - Delta(pi(1..i-1))), pi sorts m down."""
  order = sorted(range(len(m)), key=lambda i: -m[i])
  total = 0.0
  prefix = set()
  for i in order:
    before = _jaccard_set_loss(prefix, foreground)
    prefix = prefix | {i}
    total += m[i] * (_jaccard_set_loss(prefix, foreground) - before)
  return total


def _lovasz_extension_by_level_sets(m, foreground):
  """For m >= 0: integral over t >= 0 of Delta({i : m_i > t}) (no sorting)."""
  levels = sorted(set(m) | {0.0})
  total = 0.0
  for lo, hi in zip(levels[:-1], levels[1:]):
    above = {i for i, v in enumerate(m) if v > lo}
    total += (hi - lo) * _jaccard_set_loss(above, foreground)
  return total


def _brute_lovasz_flat(logits, labels, activation="relu"):
  logits = [float(v) for v in np.ravel(logits)]
  labels = [float(v) for v in np.ravel(labels)]
  foreground = {i for i, y in enumerate(labels) if y == 1}
  m = _hinge_values(logits, labels, activation)
  by_perm = _lovasz_extension_by_permutation(m, foreground)
  by_levels = _lovasz_extension_by_level_sets(m, foreground)
  # The two formulas are independent; agreeing checks the brute force itself.
  assert by_perm == pytest.approx(by_levels, abs=1e-9)
  return by_perm


def _brute_lovasz(logits, labels, per_image=True, activation="relu"):
  if not per_image:
    return _brute_lovasz_flat(logits, labels, activation)
  return float(np.mean([_brute_lovasz_flat(x, y, activation) for x, y in zip(logits, labels)]))


def _random_cases():
  rng = np.random.default_rng(0)
  cases = []
  for _ in range(6):
    cases.append(
        (
            rng.normal(scale=2.0, size=(1, 2, 3)),
            rng.integers(0, 2, size=(1, 2, 3)),
        )
    )
  shape = (1, 2, 3)
  cases.append((rng.normal(scale=2.0, size=shape), np.zeros(shape)))
  cases.append((rng.normal(scale=2.0, size=shape), np.ones(shape)))
  # All errors negative (a confident, correct prediction): loss 0 for relu.
  labels = rng.integers(0, 2, size=shape)
  cases.append(((2 * labels - 1) * 3.0 + rng.normal(0, 0.1, shape), labels))
  # A small batch mixing empty, full and random images.
  labels = np.stack(
      [
          np.zeros((2, 3)),
          np.ones((2, 3)),
          rng.integers(0, 2, size=(2, 3)),
      ]
  )
  cases.append((rng.normal(scale=2.0, size=(3, 2, 3)), labels))
  return cases


_CASES = _random_cases()


# ----------------------------------------------------------------------------
# BCE and Dice.
# ----------------------------------------------------------------------------


def test_bce_hand_computed():
  logits = jnp.array([[[0.0, 2.0]]])
  labels = jnp.array([[[1, 0]]])
  # -log sigmoid(0) = log 2;  -log(1 - sigmoid(2)) = log(1 + e^2).
  expected = (math.log(2.0) + math.log(1.0 + math.exp(2.0))) / 2.0
  out = losses.bce(logits, labels)
  assert out.dtype == jnp.float32
  assert float(out) == pytest.approx(expected, rel=1e-6)


def test_soft_dice_hand_computed():
  logits = jnp.zeros((2, 1, 2))
  labels = jnp.array([[[1.0, 0.0]], [[0.0, 0.0]]])
  # Image 0: p = (.5, .5), sum(p y) = .5, sum p = 1, sum y = 1:
  #   1 - (2 * .5 + 1) / (1 + 1 + 1) = 1/3.
  # Image 1: 1 - (0 + 1) / (1 + 0 + 1) = 1/2.
  expected = (1.0 / 3.0 + 1.0 / 2.0) / 2.0
  assert float(losses.soft_dice(logits, labels)) == pytest.approx(expected, rel=1e-6)
  # smooth = 0 on image 0 alone: 1 - 1 / 2.
  assert float(losses.soft_dice(logits[:1], labels[:1], smooth=0.0)) == pytest.approx(0.5, rel=1e-6)


def test_soft_dice_perfect_prediction_is_near_zero():
  labels = jnp.array(
      [
          [[1.0, 0.0], [1.0, 1.0]],
          [[0.0, 0.0], [0.0, 0.0]],  # Empty truth, empty prediction.
      ]
  )
  logits = 30.0 * (2.0 * labels - 1.0)
  assert float(losses.soft_dice(logits, labels)) == pytest.approx(0.0, abs=1e-6)


def test_bce_dice_is_the_weighted_sum():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 2, size=(3, 4, 5)))
  expected = 2.0 * losses.bce(logits, labels) + 0.5 * losses.soft_dice(logits, labels)
  np.testing.assert_allclose(
      losses.bce_dice(logits, labels, bce_weight=2.0, dice_weight=0.5),
      expected,
      rtol=1e-6,
  )
  np.testing.assert_allclose(
      losses.get_loss_fn("bce_dice", bce_weight=2.0, dice_weight=0.5)(logits, labels),
      expected,
      rtol=1e-6,
  )


def test_low_precision_logits_are_computed_in_float32():
  logits = jnp.array([[[0.0, 2.0]]], jnp.bfloat16)
  labels = jnp.array([[[1.0, 0.0]]])
  for fn in losses.LOSSES.values():
    assert fn(logits, labels).dtype == jnp.float32


# ----------------------------------------------------------------------------
# Lovász hinge.
# ----------------------------------------------------------------------------


def test_lovasz_grad_on_empty_image_matches_reference():
  # gts = 0: union = 1, 2, 3, ...; jaccard = 1 everywhere; diff = [1, 0, 0].
  np.testing.assert_allclose(losses.lovasz_grad(jnp.zeros(3)), [1.0, 0.0, 0.0])
  np.testing.assert_allclose(losses.lovasz_grad(jnp.ones(1)), [1.0])


@pytest.mark.parametrize("activation", ["relu", "elu"])
@pytest.mark.parametrize("case", range(len(_CASES)))
def test_lovasz_hinge_matches_brute_force(case, activation):
  logits, labels = _CASES[case]
  for per_image in (True, False):
    got = losses.lovasz_hinge(
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(labels),
        per_image=per_image,
        activation=activation,
    )
    want = _brute_lovasz(logits, labels, per_image, activation)
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_lovasz_extension_equals_jaccard_loss_on_indicator_vectors():
  # Every labelling y of 6 pixels and every set M of mispredicted pixels, as
  # one batch of 64 * 64 images: logits x = (1 - m) s give hinge errors
  # exactly m in {0, 1}^6, where the extension must equal Delta_J1(M).
  bits = np.array(list(itertools.product([0.0, 1.0], repeat=6)))
  labels = np.repeat(bits, len(bits), axis=0)
  m = np.tile(bits, (len(bits), 1))
  logits = (1.0 - m) * (2.0 * labels - 1.0)
  got = losses.lovasz_hinge_per_image(
      jnp.asarray(logits.reshape(-1, 2, 3)),
      jnp.asarray(labels.reshape(-1, 2, 3)),
  )
  want = [
      _jaccard_set_loss({i for i in range(6) if mi[i]}, {i for i in range(6) if yi[i]})
      for yi, mi in zip(labels, m)
  ]
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def _logits_with_separated_errors(labels, rng):
  """Logits whose hinge errors are distinct and away from the relu kink at 0."""
  n = labels.size
  errors = rng.permutation(np.linspace(-2.0, 3.0, n) + 0.1)
  assert np.min(np.abs(errors)) > 0.02
  signs = 2.0 * labels - 1.0
  return ((1.0 - errors.reshape(labels.shape)) * signs).astype(np.float32)


@pytest.mark.parametrize("activation", ["relu", "elu"])
@pytest.mark.parametrize("per_image", [True, False])
def test_lovasz_hinge_gradient_matches_finite_differences(per_image, activation):
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 2, size=(2, 3, 4)).astype(np.float32)
  labels[0] = 0.0  # Include an all-empty image.
  logits = _logits_with_separated_errors(labels, rng)
  fn = jax.jit(lambda x: losses.lovasz_hinge(x, labels, per_image=per_image, activation=activation))
  grad = np.asarray(jax.grad(fn)(jnp.asarray(logits)))
  # Errors are ~0.2 apart, so a step of 1e-2 never reorders them: the relu
  # loss is exactly linear there, and the elu one smooth.
  eps = 1e-2
  numeric = np.zeros_like(logits)
  for idx in np.ndindex(logits.shape):
    plus, minus = logits.copy(), logits.copy()
    plus[idx] += eps
    minus[idx] -= eps
    numeric[idx] = (float(fn(plus)) - float(fn(minus))) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, atol=2e-4)
  assert np.any(grad != 0)


def test_symmetric_lovasz_is_the_average_of_both_classes():
  logits, labels = _CASES[-1]
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels, jnp.float32)
  for activation in ("relu", "elu"):
    want = 0.5 * (
        losses.lovasz_hinge(logits, labels, activation=activation)
        + losses.lovasz_hinge(-logits, 1.0 - labels, activation=activation)
    )
    got = losses.symmetric_lovasz(logits, labels, activation=activation)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    name = "lovasz_symmetric" + ("_elu" if activation == "elu" else "")
    np.testing.assert_allclose(losses.get_loss_fn(name)(logits, labels), want, rtol=1e-6)


def test_elu_variant_differs_from_relu_as_expected():
  # labels (1, 0), logits (2, -3): errors (-1, -2), both beyond the margin.
  # relu: 0. elu + 1: sorted errors (-1 [y=1], -2 [y=0]); gts = 1,
  # intersection (0, 0), union (1, 2), jaccard (1, 1), grad (1, 0)
  # -> loss = elu(-1) + 1 = e^-1.
  logits = jnp.array([[[2.0, -3.0]]])
  labels = jnp.array([[[1.0, 0.0]]])
  assert float(losses.lovasz_hinge(logits, labels)) == 0.0
  assert float(losses.lovasz_hinge(logits, labels, activation="elu")) == pytest.approx(
      math.exp(-1.0), rel=1e-6
  )
  # All errors positive: elu(e) + 1 = e + 1 and the grad weights sum to
  # Delta(all pixels) = 1, so the elu loss is the relu loss plus 1.
  logits = jnp.array([[[-0.5, 0.2, 0.3]]])
  labels = jnp.array([[[1.0, 0.0, 1.0]]])
  np.testing.assert_allclose(
      losses.lovasz_hinge(logits, labels, activation="elu"),
      losses.lovasz_hinge(logits, labels) + 1.0,
      rtol=1e-6,
  )
  with pytest.raises(ValueError, match="softplus"):
    losses.lovasz_hinge(logits, labels, activation="softplus")


# ----------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------


def test_registry_names():
  assert set(losses.LOSSES) == {
      "bce",
      "dice",
      "bce_dice",
      "lovasz",
      "lovasz_elu",
      "lovasz_symmetric",
      "lovasz_symmetric_elu",
  }


def test_get_loss_fn_unknown_name():
  with pytest.raises(ValueError, match="no_such_loss") as info:
    losses.get_loss_fn("no_such_loss")
  assert "lovasz_symmetric_elu" in str(info.value)


def test_all_losses_work_under_jit():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(2, 5, 5)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 2, size=(2, 5, 5)), jnp.float32)
  labels = labels.at[0].set(0.0)
  for name in losses.LOSSES:
    fn = losses.get_loss_fn(name)
    eager = fn(logits, labels)
    jitted = jax.jit(fn)(logits, labels)
    grad = jax.jit(jax.grad(fn))(logits, labels)
    assert eager.shape == ()
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, err_msg=name)
    assert np.all(np.isfinite(np.asarray(grad))), name


# ----------------------------------------------------------------------------
# model_loss.
# ----------------------------------------------------------------------------


def _config(**kwargs):
  fields = dict(
      name="bce",
      bce_weight=1.0,
      dice_weight=1.0,
      deep_supervision_weight=0.1,
      classifier_weight=0.05,
  )
  fields.update(kwargs)
  return types.SimpleNamespace(**fields)


def test_model_loss_main_only():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(2, 3, 3)), jnp.float32)
  masks = jnp.asarray(rng.integers(0, 2, size=(2, 3, 3)))
  loss, aux = losses.model_loss({"logits": logits}, masks, _config())
  assert set(aux) == {"main"}
  np.testing.assert_allclose(loss, losses.bce(logits, masks), rtol=1e-6)
  # `name` overrides the config (second stage of the schedule).
  loss, aux = losses.model_loss({"logits": logits}, masks, _config(), name="lovasz")
  np.testing.assert_allclose(loss, losses.lovasz_hinge(logits, masks), rtol=1e-6)


def test_model_loss_side_and_class_terms_by_hand():
  # Image 1 is empty; images 0 and 2 have salt.
  masks = np.zeros((3, 1, 2), np.float32)
  masks[0, 0, 0] = 1.0
  masks[2] = 1.0
  logits = np.zeros((3, 1, 2), np.float32)
  side_a = np.array([[[0.0, 0.0]], [[9.0, 9.0]], [[2.0, 2.0]]], np.float32)
  side_b = np.array([[[1.0, -1.0]], [[-5.0, 7.0]], [[0.0, 0.0]]], np.float32)
  class_logits = np.array([0.0, 0.0, 2.0], np.float32)
  outputs = {
      "logits": jnp.asarray(logits),
      "side_logits": [jnp.asarray(side_a), jnp.asarray(side_b)],
      "class_logits": jnp.asarray(class_logits),
  }
  loss, aux = losses.model_loss(outputs, jnp.asarray(masks), _config())

  log2 = math.log(2.0)
  main = log2  # Every logit is 0.
  # Per-image BCE of the side outputs on images 0 and 2 only.
  a0 = log2  # Image 0 of side_a: logits 0.
  a2 = -math.log(_sigmoid(2.0))  # Image 2: both pixels salt, logit 2.
  b0 = -math.log(_sigmoid(1.0))  # Image 0: (1 vs 1), (-1 vs 0): equal terms.
  b2 = log2
  side = ((a0 + a2) / 2.0 + (b0 + b2) / 2.0) / 2.0
  # has_salt = (1, 0, 1).
  cls = (log2 + log2 - math.log(_sigmoid(2.0))) / 3.0
  assert set(aux) == {"main", "side", "class"}
  assert float(aux["main"]) == pytest.approx(main, rel=1e-6)
  assert float(aux["side"]) == pytest.approx(side, rel=1e-6)
  assert float(aux["class"]) == pytest.approx(cls, rel=1e-6)
  assert float(loss) == pytest.approx(main + 0.1 * side + 0.05 * cls, rel=1e-6)

  # The empty image's side logits get no gradient; the others do.
  def side_term(side_list):
    return losses.model_loss(dict(outputs, side_logits=side_list), jnp.asarray(masks), _config())[
        1
    ]["side"]

  grads = jax.jit(jax.grad(side_term))([jnp.asarray(side_a), jnp.asarray(side_b)])
  for g in grads:
    assert np.all(np.asarray(g)[1] == 0.0)
    assert np.any(np.asarray(g)[[0, 2]] != 0.0)


def test_model_loss_side_term_on_a_batch_without_salt_is_zero():
  masks = jnp.zeros((2, 2, 2))
  side = jnp.ones((2, 2, 2))
  outputs = {"logits": jnp.zeros((2, 2, 2)), "side_logits": [side]}
  cfg = _config(name="lovasz_symmetric_elu")
  loss, aux = jax.jit(lambda o, m: losses.model_loss(o, m, cfg))(outputs, masks)
  assert float(aux["side"]) == 0.0
  np.testing.assert_allclose(loss, aux["main"], rtol=1e-6)
  grad = jax.jit(
      jax.grad(lambda s: losses.model_loss(dict(outputs, side_logits=[s]), masks, cfg)[0])
  )(side)
  np.testing.assert_array_equal(grad, 0.0)


def test_model_loss_under_jit_with_config_dict():
  ml_collections = pytest.importorskip("ml_collections")
  cfg = ml_collections.ConfigDict(
      dict(
          name="bce_dice",
          bce_weight=1.0,
          dice_weight=1.0,
          deep_supervision_weight=0.1,
          classifier_weight=0.05,
      )
  )
  rng = np.random.default_rng(5)
  masks = rng.integers(0, 2, size=(3, 4, 4)).astype(np.float32)
  masks[1] = 0.0
  outputs = {
      "logits": jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.bfloat16),
      "side_logits": [jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32) for _ in range(3)],
      "class_logits": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
  }
  for name in (None, "lovasz"):
    fn = lambda o, m, name=name: losses.model_loss(o, m, cfg, name=name)
    eager_loss, eager_aux = fn(outputs, masks)
    loss, aux = jax.jit(fn)(outputs, masks)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, eager_loss, rtol=1e-5)
    for key in ("main", "side", "class"):
      assert aux[key].dtype == jnp.float32
      np.testing.assert_allclose(aux[key], eager_aux[key], rtol=1e-5)
    grads = jax.jit(jax.grad(lambda o, m: fn(o, m)[0]))(outputs, masks)
    for leaf in jax.tree_util.tree_leaves(grads):
      assert np.all(np.isfinite(np.asarray(leaf, np.float32)))

"""Segmentation losses on logits, in JAX.

Every loss takes `logits` of shape (B, H, W) (any float dtype) and `labels` of
the same shape with values in {0, 1} (float, int or bool), and computes in
float32: mixed-precision models hand over bfloat16 logits, and the cumulative
sums in the Lovász gradient and the sums in Dice need float32 to stay exact
over a 101x101 image.

Unless stated otherwise a loss returns a scalar: the mean over the batch of a
per-image value. Each loss also has a per-image form (shape (B,)) used by
`model_loss` to restrict the deep-supervision term to images that contain salt
while staying jit-able (a weight per image instead of boolean indexing).

The Lovász hinge follows the authors' reference implementation
(bermanmaxim/LovaszSoftmax, pytorch/lovasz_losses.py) exactly: the sort
permutation is a constant for the gradient, as `perm` is there.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
LossFn = Callable[[Array, Array], Array]
PerImageLossFn = Callable[[Array, Array], Array]


def _as_f32(logits: Array, labels: Array) -> Tuple[Array, Array]:
  return jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.float32)


def _flatten_images(x: Array) -> Array:
  """(B, H, W) -> (B, H*W)."""
  return x.reshape(x.shape[0], -1)


# ----------------------------------------------------------------------------
# Binary cross-entropy and Dice.
# ----------------------------------------------------------------------------


def bce_per_image(logits: Array, labels: Array) -> Array:
  """Mean binary cross-entropy with logits over the pixels of each image."""
  logits, labels = _as_f32(logits, labels)
  losses = optax.sigmoid_binary_cross_entropy(logits, labels)
  return _flatten_images(losses).mean(axis=1)


def bce(logits: Array, labels: Array) -> Array:
  """Mean binary cross-entropy with logits over all pixels of the batch."""
  # All images have the same pixel count, so the mean of per-image means is
  # the mean over all pixels.
  return bce_per_image(logits, labels).mean()


def soft_dice_per_image(logits: Array, labels: Array, smooth: float = 1.0) -> Array:
  """Soft Dice loss per image: 1 - (2 sum(p y) + s) / (sum p + sum y + s)."""
  logits, labels = _as_f32(logits, labels)
  probs = _flatten_images(jax.nn.sigmoid(logits))
  labels = _flatten_images(labels)
  intersection = jnp.sum(probs * labels, axis=1)
  denominator = jnp.sum(probs, axis=1) + jnp.sum(labels, axis=1)
  # `smooth` makes an empty truth with an empty prediction score a loss of ~0
  # instead of 0/0.
  return 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)


def soft_dice(logits: Array, labels: Array, smooth: float = 1.0) -> Array:
  """Soft Dice loss computed per image, averaged over the batch."""
  return soft_dice_per_image(logits, labels, smooth=smooth).mean()


def bce_dice_per_image(
    logits: Array,
    labels: Array,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
) -> Array:
  """bce_weight * BCE + dice_weight * soft Dice, per image."""
  return bce_weight * bce_per_image(logits, labels) + dice_weight * soft_dice_per_image(
      logits, labels
  )


def bce_dice(
    logits: Array,
    labels: Array,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
) -> Array:
  """bce_weight * BCE + dice_weight * soft Dice, averaged over the batch."""
  return bce_dice_per_image(logits, labels, bce_weight=bce_weight, dice_weight=dice_weight).mean()


# ----------------------------------------------------------------------------
# Lovász hinge (Berman, Rannen Triki and Blaschko, CVPR 2018).
# ----------------------------------------------------------------------------


def lovasz_grad(gt_sorted: Array) -> Array:
  """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors.

  Same computation as `lovasz_grad` in the reference code. Entry i is
  Delta(first i+1 pixels mispredicted) - Delta(first i pixels mispredicted),
  with Delta the Jaccard loss of the foreground class. For an all-background
  image (gts = 0) the union is still positive from the first pixel on, so this
  is well defined and equals [1, 0, ..., 0].

  Args:
    gt_sorted: (P,) float labels ordered by decreasing error.

  Returns:
    (P,) float weights.
  """
  gts = jnp.sum(gt_sorted)
  intersection = gts - jnp.cumsum(gt_sorted)
  union = gts + jnp.cumsum(1.0 - gt_sorted)
  jaccard = 1.0 - intersection / union
  # First differences; a 1-pixel input keeps its single entry.
  return jnp.concatenate([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def _hinge_activation(activation: str) -> Callable[[Array], Array]:
  if activation == "relu":
    return jax.nn.relu
  if activation == "elu":
    # The TGS variant: elu(x) + 1 is smooth and strictly positive, so pixels
    # already beyond the margin still get a (small) gradient.
    return lambda x: jax.nn.elu(x) + 1.0
  raise ValueError(f"Unknown Lovász activation {activation!r}; expected 'relu' or 'elu'.")


def _lovasz_hinge_flat(logits: Array, labels: Array, activation: Callable[[Array], Array]) -> Array:
  """Lovász hinge of one flat (P,) vector of logits; `lovasz_hinge_flat`."""
  signs = 2.0 * labels - 1.0
  errors = 1.0 - logits * signs
  # The permutation is piecewise constant in the logits: compute it from
  # stopped errors so that, like the reference's `perm`, it carries no
  # gradient; the gradient then flows through the gather only.
  perm = jnp.argsort(-jax.lax.stop_gradient(errors))
  errors_sorted = errors[perm]
  gt_sorted = labels[perm]
  grad = jax.lax.stop_gradient(lovasz_grad(gt_sorted))
  return jnp.dot(activation(errors_sorted), grad)


def lovasz_hinge_per_image(logits: Array, labels: Array, activation: str = "relu") -> Array:
  """Lovász hinge of each image, shape (B,)."""
  logits, labels = _as_f32(logits, labels)
  act = _hinge_activation(activation)
  return jax.vmap(functools.partial(_lovasz_hinge_flat, activation=act))(
      _flatten_images(logits), _flatten_images(labels)
  )


def lovasz_hinge(
    logits: Array,
    labels: Array,
    per_image: bool = True,
    activation: str = "relu",
) -> Array:
  """Binary Lovász hinge loss.

  Args:
    logits: (B, H, W) logits.
    labels: (B, H, W) labels in {0, 1}.
    per_image: if True, the loss of each image averaged over the batch (the
      image-level IoU the competition scores); if False, one loss over all
      pixels of the batch.
    activation: 'relu' (the paper) or 'elu' (elu(x) + 1).

  Returns:
    Scalar float32 loss.
  """
  if per_image:
    return lovasz_hinge_per_image(logits, labels, activation=activation).mean()
  logits, labels = _as_f32(logits, labels)
  return _lovasz_hinge_flat(logits.reshape(-1), labels.reshape(-1), _hinge_activation(activation))


def symmetric_lovasz_per_image(logits: Array, labels: Array, activation: str = "relu") -> Array:
  """(L(x, y) + L(-x, 1 - y)) / 2 per image, shape (B,)."""
  logits, labels = _as_f32(logits, labels)
  return 0.5 * (
      lovasz_hinge_per_image(logits, labels, activation=activation)
      + lovasz_hinge_per_image(-logits, 1.0 - labels, activation=activation)
  )


def symmetric_lovasz(
    logits: Array,
    labels: Array,
    per_image: bool = True,
    activation: str = "relu",
) -> Array:
  """(L(x, y) + L(-x, 1 - y)) / 2: the Lovász hinge of salt and of background.

  The background term gives a gradient on images without salt, where the
  foreground Lovász hinge only looks at the single worst pixel.
  """
  logits, labels = _as_f32(logits, labels)
  return 0.5 * (
      lovasz_hinge(logits, labels, per_image=per_image, activation=activation)
      + lovasz_hinge(-logits, 1.0 - labels, per_image=per_image, activation=activation)
  )


# ----------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------


# The one table of losses: name -> per-image form (B,) given the BCE/Dice
# weights. The checks, the scalar losses and the train step all read it.
PER_IMAGE_LOSSES: Dict[str, Callable[..., PerImageLossFn]] = {
    "bce": lambda bce_weight, dice_weight: bce_per_image,
    "dice": lambda bce_weight, dice_weight: soft_dice_per_image,
    "bce_dice": lambda bce_weight, dice_weight: functools.partial(
        bce_dice_per_image, bce_weight=bce_weight, dice_weight=dice_weight
    ),
    "lovasz": lambda bce_weight, dice_weight: functools.partial(
        lovasz_hinge_per_image, activation="relu"
    ),
    "lovasz_elu": lambda bce_weight, dice_weight: functools.partial(
        lovasz_hinge_per_image, activation="elu"
    ),
    "lovasz_symmetric": lambda bce_weight, dice_weight: functools.partial(
        symmetric_lovasz_per_image, activation="relu"
    ),
    "lovasz_symmetric_elu": lambda bce_weight, dice_weight: functools.partial(
        symmetric_lovasz_per_image, activation="elu"
    ),
}


def _per_image_loss_fn(
    name: str, bce_weight: float = 1.0, dice_weight: float = 1.0
) -> PerImageLossFn:
  """The per-image (B,) form of the loss `name`."""
  if name not in PER_IMAGE_LOSSES:
    raise ValueError(
        f"Unknown loss {name!r}; valid losses are:" f' {", ".join(sorted(PER_IMAGE_LOSSES))}.'
    )
  return PER_IMAGE_LOSSES[name](bce_weight, dice_weight)


def _batch_mean(per_image_fn: PerImageLossFn) -> LossFn:
  return lambda logits, labels: per_image_fn(logits, labels).mean()


# The scalar (batch-mean) losses at default weights, from the same table.
LOSSES: Dict[str, LossFn] = {
    name: _batch_mean(_per_image_loss_fn(name)) for name in PER_IMAGE_LOSSES
}


def get_loss_fn(name: str, bce_weight: float = 1.0, dice_weight: float = 1.0) -> LossFn:
  """Returns fn(logits, labels) -> scalar for the loss `name`.

  Args:
    name: one of `LOSSES`.
    bce_weight: weight of BCE in 'bce_dice' (ignored by the other losses).
    dice_weight: weight of Dice in 'bce_dice' (ignored by the other losses).

  Raises:
    ValueError: if `name` is not a known loss.
  """
  return _batch_mean(_per_image_loss_fn(name, bce_weight=bce_weight, dice_weight=dice_weight))


# ----------------------------------------------------------------------------
# Full model loss (main + deep supervision + image classifier).
# ----------------------------------------------------------------------------


def model_loss(
    outputs: Dict[str, Any],
    masks: Array,
    loss_config: Any,
    name: Optional[str] = None,
) -> Tuple[Array, Dict[str, Array]]:
  """Total training loss of the model's outputs.

  loss = main + deep_supervision_weight * side + classifier_weight * class,
  where
    main:  the loss `name` on outputs['logits'];
    side:  if outputs has 'side_logits', the same loss on each side output,
           averaged over the images whose mask is non-empty only (the side
           outputs learn the shapes of salt, as in the top TGS solutions),
           then averaged over side outputs; 0 when no image has salt;
    class: if outputs has 'class_logits' (B,), the BCE of those logits
           against "mask is non-empty".

  Args:
    outputs: dict with 'logits' (B, H, W) and optionally 'side_logits' (a list
      of (B, H, W), same resolution as the masks) and 'class_logits' (B,).
    masks: (B, H, W) labels in {0, 1}.
    loss_config: object with attributes `name`, `bce_weight`, `dice_weight`,
      `deep_supervision_weight`, `classifier_weight` (an ml_collections
      ConfigDict). It is read in Python, so close over it (do not pass it as a
      traced argument) under jax.jit.
    name: overrides loss_config.name (for the two-stage schedule: BCE + Dice,
      then Lovász).

  Returns:
    (loss, aux): the float32 scalar total loss, and a dict of the float32
    unweighted components 'main', and 'side' / 'class' when present.
  """
  name = name if name is not None else loss_config.name
  bce_weight = getattr(loss_config, "bce_weight", 1.0)
  dice_weight = getattr(loss_config, "dice_weight", 1.0)
  per_image_fn = _per_image_loss_fn(name, bce_weight=bce_weight, dice_weight=dice_weight)
  masks = jnp.asarray(masks, jnp.float32)
  has_salt = (_flatten_images(masks).max(axis=1) > 0.5).astype(jnp.float32)

  main = per_image_fn(outputs["logits"], masks).mean()
  aux = {"main": main}
  total = main

  side_logits = outputs.get("side_logits")
  # `len` rather than truthiness: a stacked (S, B, H, W) array is also allowed.
  if side_logits is not None and len(side_logits) > 0:
    # A masked mean over the batch keeps shapes static under jit; the max(., 1)
    # makes the term exactly 0 (with zero gradient) on a batch without salt.
    n_salt = jnp.maximum(has_salt.sum(), 1.0)
    side_terms = [jnp.sum(has_salt * per_image_fn(s, masks)) / n_salt for s in side_logits]
    side = jnp.mean(jnp.stack(side_terms))
    aux["side"] = side
    total = total + getattr(loss_config, "deep_supervision_weight", 0.1) * side

  class_logits = outputs.get("class_logits")
  if class_logits is not None:
    class_logits = jnp.asarray(class_logits, jnp.float32).reshape(-1)
    cls = optax.sigmoid_binary_cross_entropy(class_logits, has_salt).mean()
    aux["class"] = cls
    total = total + getattr(loss_config, "classifier_weight", 0.05) * cls

  return total, aux

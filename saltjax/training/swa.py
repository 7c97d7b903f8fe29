"""The weight average's (SWA's) BatchNorm statistics, recomputed over one pass of the data."""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp

from saltjax import parallel
from saltjax.model import layers


def recompute_batch_stats(
    config, model, variables, batches: Callable[[int], Iterator], mesh, epoch: int
):
  """BatchNorm statistics for averaged (SWA) weights: one pass over the data.

  `batches(epoch)` yields global image batches of one fold. As
  torch.optim.swa_utils.update_bn: the averaged statistics are discarded and
  each BatchNorm's running mean and variance become the plain mean, over one
  pass, of every batch's mean and variance (torch's momentum=None), not a
  moving average started from the averaged statistics. The batch variance is
  flax's, the biased one, which is also what the model's running statistics
  hold in ordinary training; torch stores the unbiased one, larger by
  n / (n - 1) with n = batch * height * width values per channel (>= 128 at
  the deepest map of the quick config): a negligible difference, and keeping
  flax's convention keeps the SWA statistics comparable with the others.
  """
  keep = layers.BATCH_NORM_MOMENTUM

  @jax.jit
  def update(variables, mean_so_far, images, count):
    # From zeroed running statistics one train-mode update leaves exactly
    # (1 - momentum) * the batch's statistics (train mode normalises with the
    # batch's own statistics, so the running values do not enter the forward).
    zeros = jax.tree.map(jnp.zeros_like, mean_so_far)
    _, new = model.apply(
        {"params": variables["params"], "batch_stats": zeros},
        images,
        train=True,
        mutable=["batch_stats"],
    )
    return jax.tree.map(
        lambda m, s: m + (s / (1 - keep) - m) / count, mean_so_far, new["batch_stats"]
    )

  variables = parallel.place_host_values(variables, parallel.replicated(mesh), "the weight average")
  mean = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  count = 0
  for images in batches(epoch):
    count += 1
    mean = update(variables, mean, images, jnp.float32(count))
  if not count:
    raise ValueError("no training batch to recompute the SWA BatchNorm statistics on")
  return jax.device_get({"params": variables["params"], "batch_stats": mean})

"""The train state and the model it trains: F fold models as one tree.

Each fold model has its own params, BatchNorm statistics, optimiser state and
learning-rate scale; stacking F of them along a leading axis (`stack_folds`)
makes one tree that one jitted step trains, and `fold_slice` takes one fold's
back out of such a tree.
"""

from __future__ import annotations

import logging
from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from saltjax.model import unet

initialized = unet.initialized  # the name flax examples/imagenet gives it


class TrainState(train_state.TrainState):
  """Params, optimiser state, BatchNorm statistics and a host-set LR scale.

  `lr_scale` multiplies every update; reduce-on-plateau lowers it between
  epochs (the optax schedule itself is a pure function of the step).
  """

  batch_stats: Any
  lr_scale: jax.Array

  def apply_gradients(self, *, grads, **kwargs):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    updates = jax.tree.map(lambda u: u * self.lr_scale.astype(u.dtype), updates)
    return self.replace(
        step=self.step + 1,
        params=optax.apply_updates(self.params, updates),
        opt_state=opt_state,
        **kwargs,
    )


# ----------------------------------------------------------------- model ---


def create_model(config, dtype=None, platform=None) -> unet.UNet:
  return unet.create_model(config.model, dtype=dtype, platform=platform)


def initial_variables(config, model) -> dict:
  variables = initialized(jax.random.key(config.seed), model, config.image_size)
  if config.model.pretrained:
    from saltjax.model import imagenet_weights
    from saltjax.model import pretrained

    path = imagenet_weights.resolve_weights(config.model.pretrained, config.cache_dir)
    encoder = pretrained.load_resnet50(path, in_channels=config.model.in_channels)
    variables = pretrained.merge_encoder(variables, encoder)
    logging.info("Encoder initialised from %s (%s)", config.model.pretrained, path)
  return variables


def state_from_variables(model, tx, variables: dict, init_optimizer=None) -> TrainState:
  """TrainState.create for {params, batch_stats}; works under `jax.eval_shape` too."""
  return TrainState(
      step=0,
      apply_fn=model.apply,
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      tx=tx,
      opt_state=(init_optimizer or tx.init)(variables["params"]),
      lr_scale=jnp.ones((), jnp.float32),
  )


def model_variables(state) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


# -------------------------------------------------------- the fold axis ---


def stack_folds(trees: list):
  """One tree of the fold models `trees`, along a new leading (fold) axis, on the host."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def fold_slice(tree, i: int):
  """The i-th fold's tree out of one with a leading fold axis."""
  return jax.tree.map(lambda x: x[i], tree)

"""The pure step functions: one fold's train step, over folds, and the epoch's end.

`train_step` is one fold model's optimisation step (`fold_gradients`, then
`apply_fold_gradients`); `over_folds` runs a one-fold function over a leading
fold axis, so F fold models train as one program (`folds_train_step`).
`make_epoch_end_fn` validates every fold on the device and keeps each fold's
best model and weight average; `make_device_epoch_fn` makes a
whole epoch of the on-device input path one program. Nothing here touches
the host's loop, files or logs.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from saltjax import metrics
from saltjax import parallel
from saltjax.errors import ConfigError
from saltjax.model import tta
from saltjax.training import losses
from saltjax.training.state import TrainState, model_variables

if TYPE_CHECKING:
  from saltjax.training.job import Job


def fold_gradients(
    apply_fn, variables: dict, batch: dict, *, loss_config, loss_name: str
) -> tuple[Any, Any, dict]:
  """One fold model's loss gradient on a (globally sharded) batch. Pure.

  Returns (gradients, the BatchNorm statistics after the batch, step
  metrics: loss, its parts and the batch's IoU at threshold 0.5).
  """

  def loss_fn(params):
    outputs, new_model_state = apply_fn(
        {"params": params, "batch_stats": variables["batch_stats"]},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
    )
    loss, aux = losses.model_loss(outputs, batch["mask"], loss_config, name=loss_name)
    return loss, (new_model_state["batch_stats"], aux, outputs["logits"])

  (loss, (batch_stats, aux, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      variables["params"]
  )
  pred, truth = logits > 0, batch["mask"] > 0.5
  inter = jnp.sum(pred & truth, axis=(1, 2))
  union = jnp.sum(pred | truth, axis=(1, 2))
  step_metrics = {
      "loss": loss,
      "iou": jnp.mean(jnp.where(union == 0, 1.0, inter / jnp.maximum(union, 1))),
      **{f"loss_{k}": v for k, v in aux.items()},
  }
  return grads, batch_stats, step_metrics


def apply_fold_gradients(
    state: TrainState, grads, batch_stats, loss: jax.Array, *, skip_nonfinite: bool
) -> tuple[TrainState, jax.Array]:
  """One fold model's optimiser update from its gradients. Pure.

  Returns (the new state, whether the loss and every gradient were finite).
  With `skip_nonfinite`, a step whose loss or gradient is not finite changes
  no weights, BatchNorm statistics or optimiser moments, but still counts as
  a step: `step` and the schedule's own count in the optimiser state
  (optax's ScaleByScheduleState, which the learning rate is read from) go on,
  so the schedule stays on the step the epochs say (cycle ends, snapshots).
  """
  finite = jnp.isfinite(loss) & jnp.all(
      jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
  )
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if skip_nonfinite:
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    opt_state = jax.tree.map(
        lambda k, n: n if is_schedule(k) else k,
        kept.opt_state,
        new_state.opt_state,
        is_leaf=is_schedule,
    )
    new_state = kept.replace(step=new_state.step, opt_state=opt_state)
  return new_state, finite


def train_step(
    state: TrainState, batch: dict, *, loss_config, loss_name: str, skip_nonfinite: bool
) -> tuple[TrainState, dict]:
  """One optimisation step of one fold model on a (globally sharded) batch. Pure.

  `fold_gradients`, then `apply_fold_gradients`; the step metrics gain
  `finite`.
  """
  grads, batch_stats, step_metrics = fold_gradients(
      state.apply_fn, model_variables(state), batch, loss_config=loss_config, loss_name=loss_name
  )
  new_state, finite = apply_fold_gradients(
      state, grads, batch_stats, step_metrics["loss"], skip_nonfinite=skip_nonfinite
  )
  return new_state, {**step_metrics, "finite": finite}


FOLD_STRATEGIES = ("in_turn", "vmap")


def over_folds(fn: Callable, strategy: str = "vmap") -> Callable:
  """`fn` over a leading fold axis: F fold models as one program.

  'vmap': `jax.vmap(fn)`, every fold at once. Every conv becomes a grouped
  conv (`feature_group_count=F`) and the F models' weights and optimiser
  moments are read and written together.
  'in_turn': `lax.map(fn)`, the folds one after another inside the program
  (a loop over the fold axis): each iteration is one model's step on its own
  batch, with no grouped convs, still one dispatch.
  With F = 1 (one fold at a time, `parallel_folds=1`) both are pure overhead:
  the fold axis is dropped, `fn` runs unbatched and the axis is put back.
  The choice is made at trace time, from the arguments' static shapes.
  """
  if strategy not in FOLD_STRATEGIES:
    raise ConfigError(
        f"unknown config.fold_strategy {strategy!r}: use one of {', '.join(FOLD_STRATEGIES)}"
    )
  batched = jax.vmap(fn) if strategy == "vmap" else lambda *a: jax.lax.map(lambda x: fn(*x), a)

  @functools.wraps(fn)
  def call(*args):
    if {x.shape[0] for x in jax.tree.leaves(args)} == {1}:
      out = fn(*jax.tree.map(lambda x: x[0], args))
      return jax.tree.map(lambda x: x[None], out)
    return batched(*args)

  return call


def fold_strategy(config) -> str:
  return config.get("fold_strategy", "in_turn")


def state_sharding_name(config) -> str:
  """config.state_sharding: how the train state is placed (`parallel.state_sharding`)."""
  return config.get("state_sharding", "replicated")


def folds_gradients(config, loss_name: str) -> Callable:
  """fn(state, batch) -> (gradients, BatchNorm statistics, step metrics) of F fold models.

  `fold_gradients` over the leading fold axis by the config's fold strategy
  (`over_folds`); it reads only the models' variables, not the optimiser state.
  """

  def gradients(state: TrainState, batch: dict):
    one_fold = functools.partial(
        fold_gradients, state.apply_fn, loss_config=config.loss, loss_name=loss_name
    )
    return over_folds(one_fold, fold_strategy(config))(model_variables(state), batch)

  return gradients


def folds_train_step(config, loss_name: str, mesh=None) -> Callable:
  """fn(state, batch) of F fold models ((F, ...) and (F, B, ...)): `train_step` over the folds.

  The gradients are taken over the folds by the config's fold strategy
  (`folds_gradients`); the optimiser update is elementwise, so it is vmapped
  whatever the strategy: all F models' weights and moments in one pass,
  rather than sliced out of the stacked state and written back fold by fold
  inside the in-turn loop.

  With `mesh`, the gradients are pinned whole on every device (reduced over
  the batch, as data parallelism has them) before the update: where the
  optimiser's moments are split over the devices (state_sharding=
  'optimizer'), XLA would otherwise carry that split back into the backward
  pass and compute each weight gradient split over the devices, gathering
  the activations for it (five times the backward convolutions' traffic,
  compiled for a v5e-8).
  """
  gradients = folds_gradients(config, loss_name)
  update = over_folds(
      functools.partial(apply_fold_gradients, skip_nonfinite=config.nonfinite == "skip")
  )

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    grads, batch_stats, step_metrics = gradients(state, batch)
    if mesh is not None:
      grads = jax.lax.with_sharding_constraint(grads, parallel.replicated(mesh))
    new_state, finite = update(state, grads, batch_stats, step_metrics["loss"])
    return new_state, {**step_metrics, "finite": finite}

  return step


def compile_train_steps(config, mesh, state_shardings=None) -> dict[str, Callable]:
  """One jitted step per loss in use (two for the two-stage recipe).

  Each takes a state and a batch with a leading fold axis, (F, ...) and
  (F, B, ...): `folds_train_step`, so F fold models train as one program.
  The batch axis is sharded over the mesh; the new state is placed as
  `state_shardings` says (`parallel.state_sharding`; default replicated),
  the way `Job.place_state` places a state (then donated in place).
  BatchNorm statistics are over each fold's global batch.
  """
  names = {config.loss.name}
  if config.loss.second_from_epoch >= 0:
    names.add(config.loss.second_name)
  for name in names:
    losses.get_loss_fn(name)  # fail early, naming the option
  if config.nonfinite not in ("stop", "skip"):
    raise ConfigError(f"unknown config.nonfinite {config.nonfinite!r}: use 'stop' or 'skip'")
  repl, shard = parallel.replicated(mesh), parallel.data_sharding(mesh, fold_axis=True)
  state_shardings = repl if state_shardings is None else state_shardings
  return {
      name: jax.jit(
          folds_train_step(config, name, mesh),
          # The state as it comes (a program per placement); it leaves as placed.
          in_shardings=(None, shard),
          out_shardings=(state_shardings, repl),
          donate_argnums=0,
      )
      for name in names
  }


def loss_name_for_epoch(config, epoch: int) -> str:
  """The loss of 0-based `epoch`; `second_from_epoch` counts from 1, as the logs do."""
  second = config.loss.second_from_epoch
  return config.loss.second_name if 0 <= second <= epoch + 1 else config.loss.name


def _validation_sums_fn(model, config) -> Callable:
  """One fold's fn(variables, images, masks, valid) -> [sum of scores, sum of IoUs]."""
  infer = tta.make_infer_fn(model, config.image_size, config.resize_mode, "none")

  def validate(variables, images, masks, valid):
    probs = infer(variables, images)["probs"]
    pred, truth = probs > 0.5, masks > 0
    inter = jnp.sum(pred & truth, axis=(1, 2))
    union = jnp.sum(pred | truth, axis=(1, 2))
    score, iou = metrics.scores_from_counts(inter, union, jnp)
    return jnp.stack([jnp.sum(score * valid), jnp.sum(iou * valid)])

  return validate


def _select_fold_trees(take: jax.Array, new, old):
  """Per fold (leading axis), `new` where take[f] else `old`.

  Fold by fold under `lax.cond`, as an in-place update of the (donated) `old`:
  only the folds that take a new model copy it, where a `where` over the
  stack would read both trees and write a third every epoch (2 GB of memory
  traffic for 5 full-size models, a tenth of a second on a CPU).
  """
  for f in range(take.shape[0]):
    old = jax.lax.cond(
        take[f],
        lambda tree, f=f: jax.tree.map(lambda o, n: o.at[f].set(n[f]), tree, new),
        lambda tree: tree,
        old,
    )
  return old


def _swa_mean(swa, variables, count):
  """The running mean of the weights; exactly the weights at count 0."""
  return jax.tree.map(
      lambda a, v: jnp.where(count == 0, v, a + (v - a) / (count + 1)), swa, variables
  )


class ModelsInMemory(NamedTuple):
  """What the epoch programs carry on the device besides the train state (leading fold axis).

  best: each fold's best-validation variables; best_scores: (F,) float32,
  their validation scores (-1 before any); swa: the running weight average.
  """

  best: Any
  best_scores: jax.Array
  swa: Any


def make_epoch_end_fn(model, config, mesh) -> Callable:
  """fn(state, models, val, val_counts, swa_count, swa_on) -> (models, val_sums, improved).

  The end of an epoch, on the device: every fold's validation over the
  device-resident held-out batches `val` ((N, F, B, ...) images, masks,
  valid; one `lax.map` over N, each batch split over the mesh's devices as a
  training batch is), then best-model selection (a fold's model replaces its
  best where its score, sum / count in float32, beats the best's) and the
  weight average. Pure; over the folds inside (`over_folds`).
  """
  validate = over_folds(_validation_sums_fn(model, config), fold_strategy(config))
  use_swa = config.swa_from_epoch >= 0
  shard = parallel.data_sharding(mesh, fold_axis=True)

  def validate_batch(variables, batch):
    # `val` is replicated: without the constraint every device would
    # validate every image (a slice of 8 chips, 8 times the work).
    return validate(variables, *jax.lax.with_sharding_constraint(batch, shard))

  def epoch_end(state, models: ModelsInMemory, val, val_counts, swa_count, swa_on):
    variables = model_variables(state)
    sums = jnp.sum(jax.lax.map(lambda b: validate_batch(variables, b), val), axis=0)  # (F, 2)
    scores = sums[:, 0] / val_counts
    improved = scores > models.best_scores
    best = _select_fold_trees(improved, variables, models.best)
    best_scores = jnp.where(improved, scores, models.best_scores)
    swa = models.swa
    if use_swa:
      swa = jax.lax.cond(swa_on, lambda a: _swa_mean(a, variables, swa_count), lambda a: a, swa)
    return ModelsInMemory(best, best_scores, swa), sums, improved

  return epoch_end


def make_device_epoch_fn(job: "Job", loss_name: str) -> Callable:
  """fn(state, models, data, folds, val, val_counts, epoch, swa_count, swa_on) -> ...

  A whole epoch of the on-device input path as one program: a `lax.scan`
  over the epoch's steps, each making its F batches (`on_device`) and
  running the folds' train step, then the epoch's end (`make_epoch_end_fn`).
  Returns (state, models, step metrics (steps, F), validation sums (F, 2),
  improved (F,)): the host dispatches once and reads back once an epoch.
  """
  from saltjax.input_pipeline import on_device

  config, mesh = job.config, job.mesh
  batch_fn = on_device.make_train_batch_fn(config, config.batch_size)
  step = folds_train_step(config, loss_name, mesh)
  epoch_end = make_epoch_end_fn(job.model, config, mesh)
  shard = parallel.data_sharding(mesh, fold_axis=True)

  def device_epoch(state, models, data, folds, val, val_counts, epoch, swa_count, swa_on):
    def one_step(state, index):
      batch = jax.lax.with_sharding_constraint(batch_fn(data, folds, epoch, index), shard)
      return step(state, batch)

    state, step_metrics = jax.lax.scan(one_step, state, jnp.arange(job.steps_per_epoch))
    models, sums, improved = epoch_end(state, models, val, val_counts, swa_count, swa_on)
    return state, models, step_metrics, sums, improved

  return device_epoch

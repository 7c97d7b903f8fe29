"""Training: F folds at once, one jitted step over a leading fold axis.

Reads top-down as the story of training: the model and its initial
variables, the train step (one fold's, then vmapped over folds), what every
fold of a run shares (`Job`), a fold's progress, and `train_folds`, whose
epoch reads step -> log -> validate -> save.

Each fold model has its own params, BatchNorm statistics, optimiser state and
learning-rate scale, and is fed its own fold's batches; stacking F of them
along a leading axis turns F small steps (batch 32 leaves a GPU idle) into one
big one. The host syncs with the device once per epoch; checkpoints are
written in the background, at most every `config.checkpoint_every_seconds`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
import queue
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple

from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from saltjax import checkpoints as ckpt_lib
from saltjax.model import tta
from saltjax.training import losses
from saltjax import metrics
from saltjax.model import unet
from saltjax import parallel
from saltjax import workdir as workdir_lib
from saltjax.errors import ConfigError, NonFiniteError, Preempted

# The schedules and optimisers live in `optim` (config checks read their
# tables without importing training); these names stay available here.
from saltjax.training.optimizers import create_learning_rate_fn, create_optimizer, cycle_end_epochs  # noqa: F401

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


def create_model(config, dtype=None) -> unet.UNet:
  return unet.create_model(config.model, dtype=dtype)


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


def model_variables(state) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


# ----------------------------------------------------------------- steps ---


def train_step(
    state: TrainState, batch: dict, *, loss_config, loss_name: str, skip_nonfinite: bool
) -> tuple[TrainState, dict]:
  """One optimisation step of one fold model on a (globally sharded) batch. Pure.

  With `skip_nonfinite`, a step whose loss or gradient is not finite changes
  no weights, BatchNorm statistics or optimiser moments, but still counts as
  a step: `step` and the schedule's own count in the optimiser state
  (optax's ScaleByScheduleState, which the learning rate is read from) go on,
  so the schedule stays on the step the epochs say (cycle ends, snapshots).
  """

  def loss_fn(params):
    outputs, new_model_state = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
    )
    loss, aux = losses.model_loss(outputs, batch["mask"], loss_config, name=loss_name)
    return loss, (new_model_state["batch_stats"], aux, outputs["logits"])

  (loss, (batch_stats, aux, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params
  )
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
  pred, truth = logits > 0, batch["mask"] > 0.5
  inter = jnp.sum(pred & truth, axis=(1, 2))
  union = jnp.sum(pred | truth, axis=(1, 2))
  step_metrics = {
      "loss": loss,
      "finite": finite,
      "iou": jnp.mean(jnp.where(union == 0, 1.0, inter / jnp.maximum(union, 1))),
      **{f"loss_{k}": v for k, v in aux.items()},
  }
  return new_state, step_metrics


def over_folds(fn: Callable) -> Callable:
  """`jax.vmap(fn)` over a leading fold axis; one fold runs as `fn` itself.

  vmapping over a stack of weights makes every conv a grouped conv
  (`feature_group_count=F`) and batches every primitive while tracing; with
  F = 1 (one fold at a time, `parallel_folds=1`) both are pure overhead, so
  the fold axis is dropped, `fn` runs unbatched and the axis is put back.
  The choice is made at trace time, from the arguments' static shapes.
  """
  batched = jax.vmap(fn)

  @functools.wraps(fn)
  def call(*args):
    if {x.shape[0] for x in jax.tree.leaves(args)} == {1}:
      out = fn(*jax.tree.map(lambda x: x[0], args))
      return jax.tree.map(lambda x: x[None], out)
    return batched(*args)

  return call


def compile_train_steps(config, mesh) -> dict[str, Callable]:
  """One jitted step per loss in use (two for the two-stage recipe).

  Each takes a state and a batch with a leading fold axis, (F, ...) and
  (F, B, ...): the one-fold step over the fold axis (`over_folds`: a vmap, or
  the step itself for one fold), so F fold models train as one program. The
  batch axis is sharded over the mesh; the state is replicated, and BatchNorm
  statistics are over each fold's global batch.
  """
  names = {config.loss.name}
  if config.loss.second_from_epoch >= 0:
    names.add(config.loss.second_name)
  for name in names:
    losses.get_loss_fn(name)  # fail early, naming the option
  if config.nonfinite not in ("stop", "skip"):
    raise ConfigError(f"unknown config.nonfinite {config.nonfinite!r}: use 'stop' or 'skip'")
  repl, shard = parallel.replicated(mesh), parallel.data_sharding(mesh, fold_axis=True)
  return {
      name: jax.jit(
          over_folds(
              functools.partial(
                  train_step,
                  loss_config=config.loss,
                  loss_name=name,
                  skip_nonfinite=config.nonfinite == "skip",
              )
          ),
          in_shardings=(repl, shard),
          out_shardings=(repl, repl),
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


def make_epoch_end_fn(model, config) -> Callable:
  """fn(state, models, val, val_counts, swa_count, swa_on) -> (models, val_sums, improved).

  The end of an epoch, on the device: every fold's validation over the
  device-resident held-out batches `val` ((N, F, B, ...) images, masks,
  valid; one `lax.map` over N), then best-model selection (a fold's model
  replaces its best where its score, sum / count in float32, beats the
  best's) and the weight average. Pure; over the folds inside (`over_folds`).
  """
  validate = over_folds(_validation_sums_fn(model, config))
  use_swa = config.swa_from_epoch >= 0

  def epoch_end(state, models: ModelsInMemory, val, val_counts, swa_count, swa_on):
    variables = model_variables(state)
    sums = jnp.sum(jax.lax.map(lambda b: validate(variables, *b), val), axis=0)  # (F, 2)
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
  over the epoch's steps, each making its F batches (`device_input`) and
  running the vmapped train step, then the epoch's end (`make_epoch_end_fn`).
  Returns (state, models, step metrics (steps, F), validation sums (F, 2),
  improved (F,)): the host dispatches once and reads back once an epoch.
  """
  from saltjax.input_pipeline import on_device

  config, mesh = job.config, job.mesh
  batch_fn = on_device.make_train_batch_fn(config, config.batch_size)
  step = over_folds(
      functools.partial(
          train_step,
          loss_config=config.loss,
          loss_name=loss_name,
          skip_nonfinite=config.nonfinite == "skip",
      )
  )
  epoch_end = make_epoch_end_fn(job.model, config)
  shard = parallel.data_sharding(mesh, fold_axis=True)

  def device_epoch(state, models, data, folds, val, val_counts, epoch, swa_count, swa_on):
    def one_step(state, index):
      batch = jax.lax.with_sharding_constraint(batch_fn(data, folds, epoch, index), shard)
      return step(state, batch)

    state, step_metrics = jax.lax.scan(one_step, state, jnp.arange(job.steps_per_epoch))
    models, sums, improved = epoch_end(state, models, val, val_counts, swa_count, swa_on)
    return state, models, step_metrics, sums, improved

  return device_epoch


class Program:
  """A jitted function compiled on its first call, which the log times; calls counted.

  Compiling ahead of the call (`lower(...).compile()`) separates the compile
  seconds from the epoch's, and the JAX persistent cache then makes a rerun's
  compile a read. `calls` lets a test check the loop's dispatches per epoch.
  """

  def __init__(self, name: str, jitted: Callable):
    self.name, self._jitted, self._compiled = name, jitted, {}
    self.calls, self.compile_seconds = 0, 0.0

  def __call__(self, *args):
    if not hasattr(self._jitted, "lower"):  # a plain function (a test's wrapper): as it is
      self.calls += 1
      return self._jitted(*args)
    # One executable per shape of the arguments after the first (the state,
    # whose shapes follow the number of folds that the others carry too).
    key = tuple((x.shape, x.dtype) for x in jax.tree.leaves(args[1:]))
    compiled = self._compiled.get(key)
    if compiled is None:
      started = time.perf_counter()
      compiled = self._compiled[key] = self._jitted.lower(*args).compile()
      seconds = time.perf_counter() - started
      self.compile_seconds += seconds
      logging.info("Compiled %s in %.1f s.", self.name, seconds)
    self.calls += 1
    return compiled(*args)


def _stack(trees: list):
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _fold_slice(tree, i: int):
  return jax.tree.map(lambda x: x[i], tree)


# ------------------------------------------------------------------ a job ---


@dataclasses.dataclass
class Job:
  """What every fold of one run shares, built (and compiled) once per process.

  Every fold uses the same optimiser object and the same steps per epoch, so
  the jitted steps see identical state structures and compile once per
  number of folds trained together.
  """

  config: Any
  mesh: Any
  model: Any
  steps_per_epoch: int
  lr_fn: Callable
  tx: optax.GradientTransformation
  initial_variables: dict
  train_steps: dict
  writer: Any
  programs: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def create(cls, config, mesh, fold_of: np.ndarray, writer, num_extra=0) -> "Job":
    steps_per_epoch = steps_per_epoch_for(config, mesh, fold_of, num_extra)
    model = create_model(config)
    lr_fn = create_learning_rate_fn(config, steps_per_epoch)
    return cls(
        config=config,
        mesh=mesh,
        model=model,
        steps_per_epoch=steps_per_epoch,
        lr_fn=lr_fn,
        tx=create_optimizer(config, lr_fn),
        # On the host: each fold's state gets fresh device buffers, which
        # the train step may then donate.
        initial_variables=jax.device_get(initial_variables(config, model)),
        train_steps=compile_train_steps(config, mesh),
        writer=writer,
    )

  def program(self, name: str, build: Callable[[], Callable]) -> "Program":
    """The jitted `build()` under `name`, made once per job (and so compiled once)."""
    if name not in self.programs:
      self.programs[name] = Program(name, build())
    return self.programs[name]

  def train_step_program(self, loss_name: str) -> "Program":
    return self.program(f"the train step ({loss_name})", lambda: self.train_steps[loss_name])

  def epoch_end_program(self) -> "Program":
    repl = parallel.replicated(self.mesh)
    return self.program(
        "the end of an epoch (validation, best model, weight average)",
        lambda: jax.jit(
            make_epoch_end_fn(self.model, self.config), out_shardings=repl, donate_argnums=1
        ),
    )

  def device_epoch_program(self, loss_name: str) -> "Program":
    repl = parallel.replicated(self.mesh)
    return self.program(
        f"the epoch on the device ({loss_name})",
        lambda: jax.jit(
            make_device_epoch_fn(self, loss_name), out_shardings=repl, donate_argnums=(0, 1)
        ),
    )

  def new_state(self) -> TrainState:
    v = self.initial_variables
    # TrainState.create, with the optimiser's init as one compiled program: run
    # op by op it compiles a small program for every parameter shape (1.3 s of
    # a tiny CPU run's start, more on a GPU); jitted, 0.2 s, and then cached.
    return TrainState(
        step=0,
        apply_fn=self.model.apply,
        params=v["params"],
        batch_stats=v["batch_stats"],
        tx=self.tx,
        opt_state=jax.jit(self.tx.init)(v["params"]),
        lr_scale=jnp.ones((), jnp.float32),
    )


def local_batch_size(config) -> int:
  return config.batch_size // jax.process_count()


def steps_per_epoch_for(config, mesh, fold_of: np.ndarray, num_extra=0) -> int:
  """Steps per epoch (the same for every fold); checks the batch sizes fit.

  `num_extra` training examples (pseudo-labels) join every fold: a number, or
  one per fold (a sequence or a {fold: count} mapping).
  """
  parallel.check_batch_size(config.batch_size, mesh, "config.batch_size")
  parallel.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
  extra = num_extra if not isinstance(num_extra, int) else [num_extra] * config.num_folds
  if isinstance(extra, dict):
    extra = [extra.get(k, 0) for k in range(config.num_folds)]
  # Each process feeds its own shard of a fold's images and, apart, of its
  # extras (`_training_examples`): the epoch is as long as the smallest shard.
  n_proc = jax.process_count()
  smallest = min(int((fold_of != k).sum()) + int(extra[k]) for k in range(config.num_folds))
  per_process = min(
      int((fold_of != k).sum()) // n_proc + int(extra[k]) // n_proc for k in range(config.num_folds)
  )
  steps_per_epoch = per_process // local_batch_size(config)
  if steps_per_epoch == 0:
    raise ConfigError(
        f"a fold has only {smallest} training images, fewer than"
        f" config.batch_size={config.batch_size}"
    )
  return steps_per_epoch


# ----------------------------------------------------------- preemption ---

_STOP = threading.Event()


def request_stop() -> None:
  """Asks training to save its resume point after the current epoch and stop (SIGTERM)."""
  _STOP.set()


def _agree_on_save_and_stop(config, group) -> tuple[bool, bool]:
  """(save, stop) after an epoch: the same decision on every process.

  Each process wants to save when its clock says `checkpoint_every_seconds`
  have passed (or on every epoch at 0), and to stop when it got SIGTERM; on
  several hosts the wishes are OR-ed over the processes (one tiny all-gather
  per epoch), so all of them enter orbax's cross-host save, or the next
  epoch's steps, together. Deciding apart, one host could wait in the save
  barrier while another waits in the next step's all-reduce: a hang, where a
  pod whose first host gets SIGTERM must save and stop.
  """
  stop = _STOP.is_set()
  save = (
      stop
      or config.checkpoint_every_seconds == 0
      or time.monotonic() - group.saved_at >= config.checkpoint_every_seconds
  )
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    wishes = multihost_utils.process_allgather(np.array([save, stop], np.int32))
    save, stop = (bool(x) for x in np.asarray(wishes).reshape(-1, 2).max(axis=0))
  return save, stop


# ------------------------------------------------------------ a fold's data ---


def _training_examples(config, data, fold: int, fold_of: np.ndarray, extra):
  """This process's shard of fold `fold`'s training images and masks (+ extras)."""
  train_idx = np.flatnonzero(fold_of != fold)
  n_proc, proc = jax.process_count(), jax.process_index()
  per_process = len(train_idx) // n_proc
  local_idx = train_idx[proc * per_process : (proc + 1) * per_process]
  images, masks = data.train_images[local_idx], data.train_masks[local_idx]
  if extra is not None and fold in extra:
    extra_images, extra_masks = extra[fold]
    per_process = len(extra_images) // n_proc
    mine = slice(proc * per_process, (proc + 1) * per_process)
    images = np.concatenate([images, extra_images[mine]])
    masks = np.concatenate([masks, extra_masks[mine]])
  return images, masks


class TfDataFeeder:
  """One tf.data pipeline for the F folds, built once; batches reach the device ahead of use.

  `tfdata.TrainPipeline` makes each step's (F, B, ...) batch (this
  process's rows) with the epoch as data, so an epoch starts no new pipeline
  and traces nothing; a thread puts them on the devices, `device_prefetch`
  global batches ahead of the step that runs, so the step does not wait for
  the host.
  """

  def __init__(
      self,
      config,
      examples: list[tuple[np.ndarray, np.ndarray]],
      folds,
      mesh,
      steps_per_epoch: int | None = None,
      device_prefetch: int = 2,
  ):
    from saltjax.input_pipeline import tfdata  # TensorFlow: only on this path

    self._tfdata, self._mesh, self._prefetch = tfdata, mesh, device_prefetch
    self._examples, self._seeds = examples, [config.seed * 100 + fold for fold in folds]
    self._options = dict(
        batch_size=local_batch_size(config),
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        augment_spec=config.augment,
    )
    self.pipeline = tfdata.TrainPipeline(
        examples,
        self._seeds,
        steps_per_epoch=steps_per_epoch,
        num_epochs=config.num_epochs,
        **self._options,
    )
    self._fold_pipelines = {}

  def _on_device(self, host_batches: Iterator[dict], fold_axis: bool) -> Iterator[dict]:
    """Global batches made by a thread, `device_prefetch` of them ahead of the one in use.

    The thread takes the host batches and starts their transfers to the
    devices; the train loop's thread only picks up arrays that are already on
    their way, so a step is dispatched without waiting for the host.
    """
    ahead, stop = queue.Queue(maxsize=self._prefetch), threading.Event()

    def put(item) -> bool:
      while not stop.is_set():
        try:
          ahead.put(item, timeout=0.1)
          return True
        except queue.Full:
          pass
      return False

    def produce():
      try:
        for batch in host_batches:
          if not put((parallel.global_from_local(batch, self._mesh, fold_axis=fold_axis), None)):
            return
        put((None, None))  # the end
      except BaseException as error:  # handed to the consumer, raised there
        put((None, error))

    thread = threading.Thread(target=produce, name="TfDataFeeder", daemon=True)
    thread.start()
    try:
      while True:
        batch, error = ahead.get()
        if error is not None:
          raise error
        if batch is None:
          return
        yield batch
    finally:
      stop.set()
      thread.join()

  def epoch(self, epoch: int) -> Iterator[dict]:
    """Global (F, B, ...) batches of `epoch`."""
    return self._on_device(self._tfdata.epoch_iterator(self.pipeline, epoch), True)

  def fold_epoch(self, i: int, epoch: int) -> Iterator[jax.Array]:
    """Global (B, S, S, 1) images of the i-th fold's `epoch` (for BatchNorm passes).

    Every whole batch of the fold (the training epochs' batches of that fold,
    then those past the smallest fold's count).
    """
    if i not in self._fold_pipelines:
      self._fold_pipelines[i] = self._tfdata.TrainPipeline(
          [self._examples[i]], [self._seeds[i]], fold_axis=False, **self._options
      )
    host = self._tfdata.epoch_iterator(self._fold_pipelines[i], epoch)
    images = ({"image": b["image"]} for b in host)
    return (b["image"] for b in self._on_device(images, False))


class DeviceFeeder:
  """Batches made on the accelerator (config.input_pipeline='device'): no TensorFlow.

  The decoded uint8 images stay on the device; each step gathers, augments
  and resizes its F batches in one jitted function (`device_input`), so the
  host only dispatches. Epoch e's order and augmentation depend on (seed,
  fold, e) alone: a resumed run rebuilds them exactly.
  """

  def __init__(self, config, data, fold_of, folds, extra, mesh, steps_per_epoch: int):
    from saltjax.input_pipeline import on_device

    images, masks, extra_rows = [data.train_images], [data.train_masks], {}
    start = len(data.train_images)
    for fold in folds:
      if extra is not None and fold in extra:
        extra_images, extra_masks = extra[fold]
        extra_rows[fold] = np.arange(start, start + len(extra_images))
        images.append(extra_images)
        masks.append(extra_masks)
        start += len(extra_images)
    repl = parallel.replicated(mesh)
    self.data = on_device.put_on_device(
        np.concatenate(images), np.concatenate(masks), sharding=repl
    )
    self.folds = on_device.fold_indices(
        fold_of, folds, seed=config.seed, extra_rows=extra_rows, sharding=repl
    )
    self._batch = jax.jit(
        on_device.make_train_batch_fn(config, config.batch_size),
        out_shardings=parallel.data_sharding(mesh, fold_axis=True),
    )
    self._steps = steps_per_epoch

  def epoch(self, epoch: int) -> Iterator[dict]:
    """The epoch's batches one step at a time (the loop runs whole epochs in one
    program, `make_device_epoch_fn`; this serves the SWA BatchNorm pass)."""
    for step in range(self._steps):
      yield self._batch(self.data, self.folds, epoch, step)

  def fold_epoch(self, i: int, epoch: int) -> Iterator[jax.Array]:
    for batch in self.epoch(epoch):
      yield batch["image"][i]


def _validation_data(config, data, folds, fold_of, mesh) -> tuple:
  """Each fold's held-out images on the device, for `make_epoch_end_fn`.

  (images, masks, valid) of shapes (N, F, B, 101, 101) and (N, F, B): N
  batches of `eval_batch_size`, each fold padded to the longest (valid = 0 on
  padding), replicated (the program shards each batch over the mesh).
  """
  held_out = [np.flatnonzero(fold_of == k) for k in folds]
  size = config.eval_batch_size
  length = -(-max(len(i) for i in held_out) // size) * size
  images = np.zeros((len(folds), length) + data.train_images.shape[1:], np.uint8)
  masks = np.zeros_like(images)
  valid = np.zeros((len(folds), length), np.float32)
  for f, idx in enumerate(held_out):
    images[f, : len(idx)] = data.train_images[idx]
    masks[f, : len(idx)] = data.train_masks[idx]
    valid[f, : len(idx)] = 1
  batches = lambda x: np.moveaxis(x.reshape((len(folds), length // size, size) + x.shape[2:]), 1, 0)
  return jax.device_put(
      (batches(images), batches(masks), batches(valid)), parallel.replicated(mesh)
  )


# --------------------------------------------------------------- progress ---


@dataclasses.dataclass
class FoldProgress:
  """Where a fold's training stands; saved as the `latest` checkpoint's meta."""

  fold: int
  epoch: int = 0  # epochs finished
  best_score: float = -1.0
  best_epoch: int = -1
  plateau_wait: int = 0
  swa_count: int = 0
  history: list = dataclasses.field(default_factory=list)

  def meta(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_meta(cls, fold: int, meta: dict) -> "FoldProgress":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in meta.items() if k in fields}, "fold": fold})

  def summary(self, num_train: int, num_val: int) -> dict:
    return {
        "fold": self.fold,
        "val_score": self.best_score,
        "best_epoch": self.best_epoch,
        "num_train": num_train,
        "num_val": num_val,
        "history": self.history,
    }


@dataclasses.dataclass
class _Group:
  """The folds trained together, and what they hold in memory between saves."""

  folds: list[int]
  progress: list[FoldProgress]
  checkpoints: list[ckpt_lib.FoldCheckpoints]
  state: Any  # TrainState with a leading fold axis
  best: Any  # the best-validation variables of each fold (leading fold axis)
  best_scores: jax.Array  # (F,) float32 on the device: the best's validation scores
  swa: Any  # the running weight average of each fold (leading fold axis)
  snapshots: list[list]  # per fold: (epoch, variables) not yet written
  val_counts: list[int]  # held-out images per fold
  val_data: tuple  # the held-out batches on the device (`_validation_data`)
  val_counts_on_device: jax.Array  # (F,) float32: `val_counts`, for the epoch programs
  saved_best_epoch: list[int]
  saved_epoch: int
  saved_at: float


def _resume(job: Job, fold: int, checkpoints):
  """(state, progress, best, swa) of a fold from its latest checkpoint, or fresh."""
  state = job.new_state()
  variables = model_variables(state)
  latest = checkpoints.latest.latest_step()
  if latest is None:
    return state, FoldProgress(fold), variables, variables
  state, meta = checkpoints.latest.restore(latest, state, checkpoints.fingerprint)
  progress = FoldProgress.from_meta(fold, meta)
  logging.info("Fold %d: resumed from epoch %d.", fold, progress.epoch)
  best = swa = model_variables(state)
  if progress.best_epoch > 0:
    best, _ = checkpoints.best.restore(progress.best_epoch, best, checkpoints.fingerprint)
  if progress.swa_count:
    # The average as of that epoch: a later one may exist when the crash
    # came between the swa and the latest save.
    swa, _ = checkpoints.swa.restore(progress.epoch, swa, checkpoints.fingerprint)
  return state, progress, best, swa


# ------------------------------------------------------------------ folds ---


def train_folds(
    job: Job,
    workdir: pathlib.Path,
    folds: list[int],
    data,
    fold_of: np.ndarray,
    extra: dict | None = None,
) -> list[dict]:
  """Trains `folds` together (resuming each from its checkpoints); their summaries.

  `extra`: {fold: (images, masks)} added to that fold's training side only
  (pseudo-labels). Finished folds are skipped; folds resumed at different
  epochs are trained in groups that stand at the same epoch.
  """
  workdir = pathlib.Path(workdir)
  summaries = {}
  for fold in folds:
    done = workdir_lib.read_done(workdir, fold)
    if done is not None:
      logging.info("Fold %d already trained (val score %.4f): skipped.", fold, done["val_score"])
      summaries[fold] = done
  todo = [k for k in folds if k not in summaries]
  checkpoints = {
      k: ckpt_lib.FoldCheckpoints(workdir_lib.fold_dir(workdir, k), job.config, asynchronous=True)
      for k in todo
  }
  try:
    resumed = {k: _resume(job, k, checkpoints[k]) for k in todo}
    by_epoch: dict[int, list[int]] = {}
    for k in todo:
      by_epoch.setdefault(resumed[k][1].epoch, []).append(k)
    for group_folds in by_epoch.values():
      summaries.update(
          _train_group(
              job,
              workdir,
              group_folds,
              data,
              fold_of,
              extra,
              [checkpoints[k] for k in group_folds],
              [resumed[k] for k in group_folds],
          )
      )
  finally:
    for c in checkpoints.values():
      c.close()
  return [summaries[k] for k in folds]


def _train_group(job: Job, workdir, folds, data, fold_of, extra, checkpoints, resumed):
  config, mesh = job.config, job.mesh
  repl = parallel.replicated(mesh)
  if config.get("input_pipeline", "tfdata") == "device":
    feeder = DeviceFeeder(config, data, fold_of, folds, extra, mesh, job.steps_per_epoch)
  else:
    examples = [_training_examples(config, data, k, fold_of, extra) for k in folds]
    feeder = TfDataFeeder(config, examples, folds, mesh, steps_per_epoch=job.steps_per_epoch)
  first = resumed[0][1].epoch
  val_counts = [int((fold_of == k).sum()) for k in folds]
  group = _Group(
      folds=folds,
      progress=[r[1] for r in resumed],
      checkpoints=checkpoints,
      state=jax.device_put(_stack([r[0] for r in resumed]), repl),
      best=jax.device_put(_stack([r[2] for r in resumed]), repl),
      best_scores=jax.device_put(np.array([r[1].best_score for r in resumed], np.float32), repl),
      swa=jax.device_put(_stack([r[3] for r in resumed]), repl),
      snapshots=[[] for _ in folds],
      val_counts=val_counts,
      val_data=_validation_data(config, data, folds, fold_of, mesh),
      val_counts_on_device=jax.device_put(np.array(val_counts, np.float32), repl),
      saved_best_epoch=[r[1].best_epoch for r in resumed],
      saved_epoch=first,
      saved_at=time.monotonic(),
  )
  cycle_ends = set(cycle_end_epochs(config))
  logging.info("Training fold(s) %s together from epoch %d.", folds, first)

  for epoch in range(first, config.num_epochs):
    profiling = epoch + 1 == config.get("profile_epoch", 0)
    if profiling:
      jax.profiler.start_trace(str(workdir / workdir_lib.TENSORBOARD))
    started = time.time()
    compile_before = sum(p.compile_seconds for p in job.programs.values())
    pending, val_sums, improved = _run_epoch(job, group, feeder, epoch)
    # The epoch's one host sync: step metrics, validation and choices together.
    host_steps, host_val, host_improved, lr_scales = jax.device_get(
        (pending, val_sums, improved, group.state.lr_scale)
    )
    if profiling:
      jax.profiler.stop_trace()
      logging.info(
          "Profile of epoch %d written to %s.", epoch + 1, workdir / workdir_lib.TENSORBOARD
      )
    compiling = sum(p.compile_seconds for p in job.programs.values()) - compile_before
    if isinstance(host_steps, dict):  # stacked by the epoch program: one dict per step
      host_steps = [{k: v[j] for k, v in host_steps.items()} for j in range(job.steps_per_epoch)]
    _record_epoch(job, group, epoch, host_steps, host_val, lr_scales, started, compiling)
    _update_models(job, group, epoch, host_improved, cycle_ends)
    save, stop = _agree_on_save_and_stop(config, group)
    if save or epoch + 1 == config.num_epochs:
      _save(group, epoch + 1)
    if job.writer is not None:
      job.writer.flush()
    if stop:
      for c in group.checkpoints:
        c.finish()
      raise Preempted(
          f"stopped by SIGTERM after epoch {epoch + 1} of fold(s)"
          f" {', '.join(map(str, folds))}; the resume point is saved in {workdir}: run the"
          " same command again to go on"
      )

  summaries = {}
  swa = jax.device_get(group.swa) if group.progress[0].swa_count else None
  for i, fold in enumerate(folds):
    progress = group.progress[i]
    if progress.swa_count:
      fold_swa = recompute_batch_stats(
          config,
          job.model,
          _fold_slice(swa, i),
          functools.partial(feeder.fold_epoch, i),
          mesh,
          config.num_epochs,
      )
      group.checkpoints[i].save_model(
          "swa",
          config.num_epochs + 1,
          fold_swa,
          {"epoch": config.num_epochs, "fold": fold, "count": progress.swa_count},
      )
    group.checkpoints[i].finish()
    summary = progress.summary(
        num_train=int((fold_of != fold).sum()), num_val=int((fold_of == fold).sum())
    )
    if jax.process_index() == 0:
      workdir_lib.write_json(summary, workdir_lib.done_path(workdir, fold))
    summaries[fold] = summary
  return summaries


def _run_epoch(job: Job, group: _Group, feeder, epoch: int) -> tuple:
  """The epoch's train steps and its end (`make_epoch_end_fn`); results stay on the device.

  Returns (step metrics: {name: (steps, F)} from the one program, or a list
  of each step's {name: (F,)}; validation sums (F, 2); improved
  (F,)) and leaves the new state, best models, their scores and the weight
  average in `group`. On the device input path the whole epoch is one
  program; with tf.data, one program a step (the host makes the batches)
  and one for the epoch's end.
  """
  config, repl = job.config, parallel.replicated(job.mesh)
  loss_name = loss_name_for_epoch(config, epoch)
  models = ModelsInMemory(group.best, group.best_scores, group.swa)
  epoch_values = jax.device_put(
      (
          np.int32(epoch),
          np.float32(group.progress[0].swa_count),
          np.bool_(0 <= config.swa_from_epoch <= epoch + 1),
      ),
      repl,
  )
  if isinstance(feeder, DeviceFeeder):
    group.state, models, pending, val_sums, improved = job.device_epoch_program(loss_name)(
        group.state,
        models,
        feeder.data,
        feeder.folds,
        group.val_data,
        group.val_counts_on_device,
        *epoch_values,
    )
  else:
    step_fn = job.train_step_program(loss_name)
    pending = []
    images_per_step = config.batch_size * len(group.folds)
    bar = tqdm.tqdm(
        total=job.steps_per_epoch * images_per_step,
        unit="img",
        desc=f"fold(s) {','.join(map(str, group.folds))} epoch {epoch + 1}/{config.num_epochs}",
        disable=not tta.progress_enabled(config),
        leave=False,
    )
    batches = feeder.epoch(epoch)
    try:
      for _, batch in zip(range(job.steps_per_epoch), batches):
        group.state, step_metrics = step_fn(group.state, batch)
        pending.append(step_metrics)
        bar.update(images_per_step)
    finally:
      batches.close()  # stops the feeder's thread
      bar.close()
    models, val_sums, improved = job.epoch_end_program()(
        group.state, models, group.val_data, group.val_counts_on_device, *epoch_values[1:]
    )
  group.best, group.best_scores, group.swa = models
  return pending, val_sums, improved


def _record_epoch(
    job: Job,
    group: _Group,
    epoch: int,
    host_steps: list[dict],
    host_val: np.ndarray,
    lr_scales: np.ndarray,
    started: float,
    compile_seconds: float = 0.0,
) -> None:
  """Non-finite steps, the epoch's history record and the logs, per fold.

  The log gives the epoch's seconds and its training images per second (all
  folds, compilation in the epoch left out).
  """
  config, writer = job.config, job.writer
  seconds = time.time() - started
  images_per_second = (
      job.steps_per_epoch
      * config.batch_size
      * len(group.folds)
      / max(seconds - compile_seconds, 1e-9)
  )
  first_step = epoch * job.steps_per_epoch + 1
  for i, fold in enumerate(group.folds):
    steps = [{k: v[i] for k, v in m.items()} for m in host_steps]
    bad = [first_step + j for j, m in enumerate(steps) if not m["finite"]]
    if bad and config.nonfinite == "stop":
      last = group.saved_epoch
      where = (
          f"the last good checkpoint is epoch {last} in" f" {group.checkpoints[i].latest.directory}"
          if last
          else "no checkpoint was written yet"
      )
      others = [k for k in group.folds if k != fold]
      together = (
          f" Fold(s) {', '.join(map(str, others))}, trained together with fold {fold}, stopped"
          " with it and resume from the same epoch."
          if others
          else ""
      )
      raise NonFiniteError(
          f"non-finite loss or gradient at step {bad[0]} (fold {fold}, epoch {epoch + 1});"
          f" training stopped and {where}.{together} Lower config.optimizer.learning_rate, set"
          " config.optimizer.grad_clip, or set config.nonfinite='skip' to skip such steps."
      )
    if bad:
      logging.warning(
          "fold %d epoch %d: skipped %d non-finite step(s), first at step %d",
          fold,
          epoch + 1,
          len(bad),
          bad[0],
      )
    good = [m for m in steps if m["finite"]]
    if writer is not None:
      for start in range(0, len(steps), config.log_every_steps):
        window = [m for m in steps[start : start + config.log_every_steps] if m["finite"]]
        if window:
          writer.write_scalars(
              first_step + min(start + config.log_every_steps, len(steps)) - 1,
              {
                  f"fold_{fold}/train_{k}": float(np.mean([m[k] for m in window]))
                  for k in window[0]
                  if k != "finite"
              },
          )
    val_score, val_iou = (float(x) for x in host_val[i] / group.val_counts[i])
    lr = float(job.lr_fn((epoch + 1) * job.steps_per_epoch - 1)) * float(lr_scales[i])
    record = {
        "epoch": epoch + 1,
        "train_loss": float(np.mean([float(m["loss"]) for m in good])) if good else float("nan"),
        "val_score": val_score,
        "val_iou": val_iou,
        "learning_rate": lr,
        "loss_name": loss_name_for_epoch(config, epoch),
        "seconds": seconds,
        "images_per_second": images_per_second,
    }
    group.progress[i].history.append(record)
    if writer is not None:
      writer.write_scalars(
          (epoch + 1) * job.steps_per_epoch,
          {f"fold_{fold}/{k}": v for k, v in record.items() if k != "loss_name"},
      )
    logging.info(
        "fold %d epoch %3d/%d  loss %.4f  val score %.4f  val IoU %.4f  lr %.2e  %.1fs"
        "  %.0f img/s",
        fold,
        epoch + 1,
        config.num_epochs,
        record["train_loss"],
        val_score,
        val_iou,
        lr,
        record["seconds"],
        images_per_second,
    )


def _update_models(
    job: Job, group: _Group, epoch: int, improved: np.ndarray, cycle_ends: set
) -> None:
  """The host's side of the epoch's model choices: progress, plateau and snapshots.

  The epoch's program already replaced each improved fold's best model and
  updated the weight average on the device (`make_epoch_end_fn`); `improved`
  is its verdict, which the progress records follow.
  """
  config = job.config
  factors = np.ones(len(group.folds), np.float32)
  for i, progress in enumerate(group.progress):
    progress.epoch = epoch + 1
    if improved[i]:
      progress.best_score = progress.history[-1]["val_score"]
      progress.best_epoch, progress.plateau_wait = epoch + 1, 0
    else:
      progress.plateau_wait += 1
    if (
        config.schedule.name == "plateau"
        and progress.plateau_wait >= config.schedule.plateau_patience
    ):
      factors[i] = config.schedule.plateau_factor
      progress.plateau_wait = 0
      logging.info(
          "fold %d: no better validation score for %d epochs; lr scale lowered by %g",
          group.folds[i],
          config.schedule.plateau_patience,
          config.schedule.plateau_factor,
      )
  if (factors != 1).any():
    group.state = group.state.replace(lr_scale=group.state.lr_scale * jnp.asarray(factors))
  if epoch + 1 in cycle_ends:
    # A few per run: worth a copy to the host, where it waits to be written.
    snapshot = jax.device_get(model_variables(group.state))
    for i in range(len(group.folds)):
      group.snapshots[i].append((epoch + 1, _fold_slice(snapshot, i)))
  if 0 <= config.swa_from_epoch <= epoch + 1:
    for progress in group.progress:
      progress.swa_count += 1


def _save(group: _Group, epoch: int) -> None:
  """Writes each fold's resume point; the models it refers to are written first.

  Snapshots, a new best model and the weight average are written and
  finished before `latest` is started, so a `latest` on disk never refers
  to a model that is not; `latest` itself (the largest) is written in the
  background while the next epoch trains. Older best/swa steps are deleted
  only once that `latest` is complete (`FoldCheckpoints.prune`).
  """
  new_best = [
      p.best_epoch > 0 and p.best_epoch != saved
      for p, saved in zip(group.progress, group.saved_best_epoch)
  ]
  # One copy of the stacked arrays to the host, which orbax makes anyway;
  # slicing the folds out of it is then free, where slicing each of the
  # ~1,500 device arrays per fold would dispatch (and first compile) an op.
  state, best, swa = jax.device_get(
      (
          group.state,
          group.best if any(new_best) else None,
          group.swa if group.progress[0].swa_count else None,
      )
  )
  for i, (fold, progress, checkpoints) in enumerate(
      zip(group.folds, group.progress, group.checkpoints)
  ):
    model_meta = {"fold": fold}
    for snap_epoch, variables in group.snapshots[i]:
      val = progress.history[snap_epoch - 1]["val_score"]
      checkpoints.save_model(
          "snapshots", snap_epoch, variables, {**model_meta, "epoch": snap_epoch, "val_score": val}
      )
    group.snapshots[i] = []
    if new_best[i]:
      checkpoints.save_model(
          "best",
          progress.best_epoch,
          _fold_slice(best, i),
          {**model_meta, "epoch": progress.best_epoch, "val_score": progress.best_score},
      )
      group.saved_best_epoch[i] = progress.best_epoch
    if progress.swa_count:
      checkpoints.save_model(
          "swa",
          epoch,
          _fold_slice(swa, i),
          {**model_meta, "epoch": epoch, "count": progress.swa_count},
      )
    for store in (checkpoints.best, checkpoints.snapshots, checkpoints.swa):
      store.finish()
    checkpoints.save_latest(epoch, _fold_slice(state, i), progress.meta())
  group.saved_epoch, group.saved_at = epoch, time.monotonic()


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
  keep = unet.BATCH_NORM_MOMENTUM

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

  variables = jax.device_put(variables, parallel.replicated(mesh))
  mean = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  count = 0
  for images in batches(epoch):
    count += 1
    mean = update(variables, mean, images, jnp.float32(count))
  if not count:
    raise ValueError("no training batch to recompute the SWA BatchNorm statistics on")
  return jax.device_get({"params": variables["params"], "batch_stats": mean})

"""A fold's data: its training batches (two feeders) and its held-out images on the device.

`TfDataFeeder` makes the F folds' batches with tf.data on the host and puts
them on the devices ahead of use; `DeviceFeeder` keeps the images on the
accelerator and makes the batches there (no TensorFlow). `validation_data`
puts each fold's held-out images on the device for the epoch's end.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import jax
import numpy as np

from saltjax import parallel
from saltjax.training.job import Job, local_batch_size


def create_feeder(job: Job, folds, data, fold_of: np.ndarray, extra):
  """The feeder of `config.input_pipeline` for `folds` trained together."""
  config, mesh = job.config, job.mesh
  if config.get("input_pipeline", "tfdata") == "device":
    return DeviceFeeder(config, data, fold_of, folds, extra, mesh, job.steps_per_epoch)
  examples = [_training_examples(config, data, k, fold_of, extra) for k in folds]
  return TfDataFeeder(config, examples, folds, mesh, steps_per_epoch=job.steps_per_epoch)


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
  and resizes its F batches in one jitted function (`on_device`), so the
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


def validation_data(config, data, folds, fold_of, mesh) -> tuple:
  """Each fold's held-out images on the device, for `make_epoch_end_fn`.

  `validation_batches`, replicated (the program splits each batch over the
  mesh's devices).
  """
  return parallel.place_host_values(
      validation_batches(config, data, folds, fold_of),
      parallel.replicated(mesh),
      "the held-out images",
  )


def validation_batches(config, data, folds, fold_of) -> tuple[np.ndarray, ...]:
  """(images, masks, valid) of shapes (N, F, B, 101, 101) and (N, F, B), on the host.

  N batches of `eval_batch_size`, each fold padded to the longest (valid = 0
  on padding).
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
  return batches(images), batches(masks), batches(valid)

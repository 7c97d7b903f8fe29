"""Every program a training job runs, compiled for a mesh of compile-only devices.

`job_programs` builds the job's own jitted programs (`saltjax.training.job.Job`:
the train step per loss or the device epoch, the epoch's end; the prediction
forward with TTA, `saltjax.inference.ensemble.jitted_forward`) and compiles
each at the config's real shapes, with `jax.ShapeDtypeStruct`s placed as the
job places its arrays (state replicated, batches split over the mesh).
Nothing runs: what comes back is each program's memory per chip, its FLOPs
(XLA's cost analysis) and the bytes its instructions move, in HBM and in
on-chip memory (`hlo_traffic`), per chip, and how often the job calls it.

Every figure counts a loop's body as often as it runs: the device epoch's
scan over its steps, the folds' gradients taken in turn, the validation's
loop over held-out batches, each trip count read from the compiled program
(`hlo_traffic.trip_count`); XLA's own cost analysis would count each body
once, whatever its trip count. One compile a program.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saltjax import parallel
from saltjax.app import hlo_traffic
from saltjax.app import job as job_lib
from saltjax.errors import ConfigError
from saltjax.training import feeders
from saltjax.training import steps as steps_lib
from saltjax.training.job import Job, Program
from saltjax.training.optimizers import cycle_end_epochs
from saltjax.training.state import state_from_variables


@dataclasses.dataclass
class ProgramCost:
  """One compiled program: per chip, per call; and how often the job calls it."""

  name: str
  kind: str  # 'train', 'epoch_end' or 'predict'
  compile_seconds: float
  memory_per_chip: dict  # argument, output, temp, code, total (bytes)
  flops_per_chip: float  # XLA's cost analysis, every loop body as often as it runs
  bytes_per_chip: float  # read and written by its instructions, in every memory (hlo_traffic)
  images_per_chip: float  # the images one call processes on one chip
  calls_per_epoch: int = 0  # in the first epoch of the first group of folds
  calls_per_job: int = 0
  loop_trips: dict = dataclasses.field(default_factory=dict)  # the job's loops in it
  loss: str = ""  # a training program's loss: its calls are that loss's epochs'
  hbm_bytes_per_chip: float = 0.0  # of those, read and written in HBM (hlo_traffic)
  on_chip_bytes_per_chip: float = 0.0  # and in on-chip memory (VMEM)
  hbm_bytes_by_kind: dict = dataclasses.field(default_factory=dict)
  hbm_bytes_by_phase: dict = dataclasses.field(default_factory=dict)
  # XLA's own count of bytes accessed (every memory), each loop body once.
  xla_bytes_accessed_per_chip: float = 0.0
  # The TPU compiler's estimate of one call's cycles on one chip, its
  # instructions' summed (hlo_traffic): an estimate, not a bound.
  estimated_cycles_per_chip: float = 0.0


def _cost(compiled) -> dict:
  """FLOPs and bytes of one call, every loop body counted as often as it runs."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # one dict per program in older jax
    analysis = analysis[0]
  text = compiled.as_text()
  moved = hlo_traffic.traffic(text)
  unread = [loop.body for loop in moved["loops"] if loop.trips is None]
  if unread:  # XLA's cost analysis' count: once
    logging.warning("Loops of unknown trip count, counted once: %s", ", ".join(unread))
  return {
      "flops_per_chip": hlo_traffic.flops_as_run(
          text, moved["loops"], float(analysis.get("flops", 0.0))
      ),
      "bytes_per_chip": float(moved["hbm_bytes"] + moved["on_chip_bytes"]),
      "xla_bytes_accessed_per_chip": float(analysis.get("bytes accessed", 0.0)),
      "hbm_bytes_per_chip": float(moved["hbm_bytes"]),
      "on_chip_bytes_per_chip": float(moved["on_chip_bytes"]),
      "hbm_bytes_by_kind": moved["by_kind"],
      "hbm_bytes_by_phase": moved["by_phase"],
      "estimated_cycles_per_chip": float(moved["estimated_cycles"]),
  }


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  memory = {
      "argument": int(m.argument_size_in_bytes),
      "output": int(m.output_size_in_bytes),
      "temp": int(m.temp_size_in_bytes),
      "code": int(m.generated_code_size_in_bytes),
  }
  # A donated argument's buffer is reused for an output: counted once.
  memory["total"] = sum(memory.values()) - int(m.alias_size_in_bytes)
  return memory


def _compile(name: str, program, args) -> tuple[Any, float]:
  try:
    return program.compile(*args)
  except Exception as e:  # XLA's TPU compiler refuses a program over the chip's HBM
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
      first = next((line for line in text.splitlines() if "memory" in line.lower()), text)
      raise ConfigError(f"{name} does not fit on one chip: {first.strip()}") from e
    raise


def _measure(name: str, program, args) -> dict:
  """(compile seconds, memory, FLOPs, bytes) of `program` at `args`."""
  compiled, seconds = _compile(name, program, args)
  logging.info("Compiled %s in %.1f s.", name, seconds)
  return {**_cost(compiled), "compile_seconds": seconds, "memory_per_chip": _memory(compiled)}


def _folds_in_turn(job: Job, group) -> int:
  """F where the program loops over the F folds (fold_strategy='in_turn', F >= 2), else 1."""
  in_turn = steps_lib.fold_strategy(job.config) == "in_turn" and len(group) >= 2
  return len(group) if in_turn else 1


def _abstract(tree, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def _stacked(tree, num_folds: int, sharding):
  """`tree`'s shapes with a leading fold axis of `num_folds`, placed by `sharding`.

  sharding: one for every leaf, or a tree of them (a prefix of `tree`).
  """
  return jax.tree.map(
      lambda x, where: jax.ShapeDtypeStruct((num_folds,) + tuple(x.shape), x.dtype, sharding=where),
      tree,
      jax.tree.broadcast(sharding, tree),
  )


def _accelerator_dtype(config):
  """The model's dtype on the accelerator: 'auto' means bfloat16 there (not on this CPU)."""
  return "bfloat16" if config.model.dtype == "auto" else None


def compile_job(config, devices, fold_of: np.ndarray) -> Job:
  """The job's `Job` on a mesh of `devices`, with the abstract initial variables."""
  mesh = parallel.create_mesh(devices)
  return Job.create(
      config,
      mesh,
      fold_of,
      None,
      dtype=_accelerator_dtype(config),
      platform=devices[0].platform,  # the model's 'auto' choices are the slice's
      abstract=True,
  )


def _fold_of(config, data) -> np.ndarray:
  from saltjax.data import dataset as data_lib

  return data_lib.fold_assignment(config, data)["fold"].to_numpy()


def _epochs_by_loss(config) -> dict[str, int]:
  counts = {}
  for epoch in range(config.num_epochs):
    name = steps_lib.loss_name_for_epoch(config, epoch)
    counts[name] = counts.get(name, 0) + 1
  return counts


def _models_per_fold(config) -> int:
  parts = [p.strip() for p in config.predict.checkpoints.split("+")]
  return sum(max(1, len(cycle_end_epochs(config))) if p == "snapshots" else 1 for p in parts)


KINDS = ("train", "epoch_end", "predict")


def job_programs(config, devices, data, kinds=KINDS) -> tuple[list[ProgramCost], dict]:
  """Every program the job runs (of `kinds`), compiled for `devices`; (their costs, the job's facts)."""
  fold_of = _fold_of(config, data)
  job = compile_job(config, devices, fold_of)
  chips = job.mesh.size
  groups = job_lib.fold_groups(config, job_lib.folds_to_train(config))
  device_input = config.get("input_pipeline", "tfdata") == "device"
  costs = []
  for size in sorted({len(g) for g in groups}, reverse=True):
    same_size = [g for g in groups if len(g) == size]
    first_group = groups[0] in same_size
    if device_input:
      programs = _device_epoch_programs(job, same_size[0], data, fold_of)
    else:
      programs = _step_programs(job, same_size[0], data, fold_of, "epoch_end" in kinds)
    for cost, per_epoch in programs:
      cost.calls_per_epoch = per_epoch if first_group else 0
      cost.calls_per_job = _calls_per_job(config, cost, per_epoch, len(same_size))
      costs.append(cost)
  if config.fold == -1 and "predict" in kinds:  # the job predicts once every fold is trained
    costs.append(_predict_program(job, data, fold_of))
  facts = {
      "steps_per_epoch": job.steps_per_epoch,
      "num_epochs": config.num_epochs,
      "fold_groups": groups,
      "input_pipeline": config.get("input_pipeline", "tfdata"),
      "batch_size_per_fold": config.batch_size,
      "images_per_chip_per_step": len(groups[0]) * config.batch_size / chips,
      "training_images_smallest_fold": min(
          int((fold_of != k).sum()) for k in range(config.num_folds)
      ),
      "model_dtype": str(jnp.dtype(job.model.dtype)),
      "model_final_block": job.model.final_block,
  }
  return costs, facts


def _calls_per_job(config, cost: ProgramCost, per_epoch: int, num_groups: int) -> int:
  epochs = _epochs_by_loss(config).get(cost.loss, 0) if cost.loss else config.num_epochs
  return per_epoch * epochs * num_groups


def _group_arguments(job: Job, group, data, fold_of) -> dict:
  """The abstract arguments every program of a group of folds takes."""
  config, mesh = job.config, job.mesh
  repl = parallel.replicated(mesh)
  num_folds = len(group)
  state = jax.eval_shape(
      lambda v: state_from_variables(job.model, job.tx, v), job.initial_variables
  )
  variables = _stacked(job.initial_variables, num_folds, repl)
  models = steps_lib.ModelsInMemory(
      variables, jax.ShapeDtypeStruct((num_folds,), jnp.float32, sharding=repl), variables
  )
  val = feeders.validation_batches(config, data, group, fold_of)
  return {
      "state": _stacked(state, num_folds, job.state_sharding),
      "models": models,
      "val": _abstract(val, repl),
      "val_counts": jax.ShapeDtypeStruct((num_folds,), jnp.float32, sharding=repl),
      "scalars": _abstract((np.int32(0), np.float32(0), np.bool_(False)), repl),
      "num_val_batches": len(val[0]),
  }


def _train_batch(job: Job, group, data, fold_of):
  """The abstract (F, B, ...) batch that a train step takes, as the device path makes it."""
  from saltjax.input_pipeline import on_device

  device_data, folds = _device_data(job, group, data, fold_of)
  batch_fn = on_device.make_train_batch_fn(job.config, job.config.batch_size)
  batch = jax.eval_shape(batch_fn, device_data, folds, 0, 0)
  return _abstract(batch, parallel.data_sharding(job.mesh, fold_axis=True))


def _device_data(job: Job, group, data, fold_of):
  from saltjax.input_pipeline import on_device

  repl = parallel.replicated(job.mesh)
  device_data = on_device.DeviceData(
      *_abstract((data.train_images, data.train_masks.astype(np.uint8)), repl)
  )
  folds = on_device.fold_indices(fold_of, group, seed=job.config.seed)
  return device_data, _abstract(folds, repl)


def _epoch_end_cost(job: Job, args: dict, group) -> ProgramCost:
  config, chips = job.config, job.mesh.size
  program = job.epoch_end_program()
  name = f"{program.name}, {len(group)} fold(s)"
  call = (args["state"], args["models"], args["val"], args["val_counts"], *args["scalars"][1:])
  n = args["num_val_batches"]
  figures = _measure(name, program, call)
  images = n * len(group) * config.eval_batch_size / chips
  return ProgramCost(
      name, "epoch_end", images_per_chip=images, loop_trips={"validation": n}, **figures
  )


def _step_programs(
    job: Job, group, data, fold_of, with_epoch_end=True
) -> list[tuple[ProgramCost, int]]:
  """The tf.data path: a train step per loss (a call per step), the epoch's end."""
  config, chips = job.config, job.mesh.size
  args = _group_arguments(job, group, data, fold_of)
  batch = _train_batch(job, group, data, fold_of)
  out = []
  for loss in _epochs_by_loss(config):
    program = job.train_step_program(loss)
    name = f"{program.name}, {len(group)} fold(s)"
    in_turn = _folds_in_turn(job, group)
    figures = _measure(name, program, (args["state"], batch))
    images = len(group) * config.batch_size / chips
    trips = {"folds": in_turn} if in_turn > 1 else {}
    cost = ProgramCost(
        name, "train", images_per_chip=images, loop_trips=trips, loss=loss, **figures
    )
    out.append((cost, job.steps_per_epoch if loss == config.loss.name else 0))
  if with_epoch_end:
    out.append((_epoch_end_cost(job, args, group), 1))
  return out


def _device_epoch_programs(job: Job, group, data, fold_of) -> list[tuple[ProgramCost, int]]:
  """The device path: one program an epoch per loss (its steps, then its end)."""
  config, chips = job.config, job.mesh.size
  args = _group_arguments(job, group, data, fold_of)
  device_data, folds = _device_data(job, group, data, fold_of)
  steps, n = job.steps_per_epoch, args["num_val_batches"]
  call = (
      args["state"],
      args["models"],
      device_data,
      folds,
      args["val"],
      args["val_counts"],
      *args["scalars"],
  )
  out = []
  for loss in _epochs_by_loss(config):
    program = job.device_epoch_program(loss)
    name = f"{program.name}, {len(group)} fold(s)"
    figures = _measure(name, program, call)
    images = steps * len(group) * config.batch_size / chips
    trips = {"steps": steps, "validation": n}
    cost = ProgramCost(
        name,
        "train",
        images_per_chip=images,
        loop_trips=trips,
        loss=loss,
        **figures,
    )
    out.append((cost, 1 if loss == config.loss.name else 0))
  return out


def _predict_program(job: Job, data, fold_of) -> ProgramCost:
  """The prediction forward with config.predict.tta's views: a call per batch per model."""
  from saltjax.inference import ensemble

  config, mesh = job.config, job.mesh
  forward = ensemble.jitted_forward(config, job.model, mesh)
  size = config.predict.batch_size
  variables = _abstract(job.initial_variables, parallel.replicated(mesh))
  images = jax.ShapeDtypeStruct(
      (size,) + data.train_images.shape[1:], np.uint8, sharding=parallel.data_sharding(mesh)
  )

  program = Program(f"the prediction forward (tta={config.predict.tta})", forward.infer_fn)
  figures = _measure(program.name, program, (variables, images))
  n_test = len(data.test_ids) if data.test_images is not None else 0
  calls = sum(
      _models_per_fold(config)
      * (math.ceil(int((fold_of == k).sum()) / size) + math.ceil(n_test / size))
      for k in job_lib.folds_to_train(config)
  )
  return ProgramCost(
      program.name, "predict", images_per_chip=size / mesh.size, calls_per_job=calls, **figures
  )

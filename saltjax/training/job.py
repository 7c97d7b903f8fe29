"""What every fold of a run shares (`Job`): the model, optimiser, steps and compiled programs.

Built once per process; every fold uses the same optimiser object and the
same steps per epoch, so the jitted programs compile once per number of folds
trained together.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saltjax import parallel
from saltjax.errors import ConfigError
from saltjax.training.optimizers import create_learning_rate_fn, create_optimizer
from saltjax.training.state import (
    TrainState,
    create_model,
    initial_variables,
    initialized,
    state_from_variables,
)
from saltjax.training.steps import (
    compile_train_steps,
    make_device_epoch_fn,
    make_epoch_end_fn,
    state_sharding_name,
)


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
      compiled, seconds = self.compile(*args)
      self._compiled[key] = compiled
      self.compile_seconds += seconds
      logging.info("Compiled %s in %.1f s.", self.name, seconds)
    self.calls += 1
    return compiled(*args)

  def compile(self, *args) -> tuple[Any, float]:
    """(the executable for `args`, compile seconds); not kept.

    `args` may be `jax.ShapeDtypeStruct`s placed on compile-only devices (a
    TPU slice's, `saltjax.app.compile_only`): the program the job would run
    there, without running it.
    """
    started = time.perf_counter()
    compiled = self._jitted.lower(*args).compile()
    return compiled, time.perf_counter() - started


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
  # Where a stacked train state lives: a sharding, or a tree of them (a prefix of the state).
  state_sharding: Any = None
  programs: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def create(
      cls,
      config,
      mesh,
      fold_of: np.ndarray,
      writer,
      num_extra=0,
      *,
      dtype=None,
      platform=None,
      abstract=False,
  ) -> "Job":
    """The job's model, optimiser and steps.

    dtype: the model's, overriding config.model.dtype. platform: the one the
    model is built for (default: JAX's backend), which decides the model's
    'auto' choices. abstract: the initial variables as shapes only
    (`jax.eval_shape`): a job to compile, not to run.
    """
    steps_per_epoch = steps_per_epoch_for(config, mesh, fold_of, num_extra)
    model = create_model(config, dtype=dtype, platform=platform)
    lr_fn = create_learning_rate_fn(config, steps_per_epoch)
    if abstract:
      variables = jax.eval_shape(
          lambda: initialized(jax.random.key(config.seed), model, config.image_size)
      )
    else:
      # On the host: each fold's state gets fresh device buffers, which the
      # train step may then donate.
      variables = jax.device_get(initial_variables(config, model))
    tx = create_optimizer(config, lr_fn)
    # The same placement serves any number of folds: no leaf is split along the fold axis.
    one_fold = lambda: jax.eval_shape(
        lambda v: jax.tree.map(lambda x: jnp.asarray(x)[None], state_from_variables(model, tx, v)),
        variables,
    )
    state_sharding = parallel.state_sharding(mesh, state_sharding_name(config), one_fold)
    return cls(
        config=config,
        mesh=mesh,
        model=model,
        steps_per_epoch=steps_per_epoch,
        lr_fn=lr_fn,
        tx=tx,
        initial_variables=variables,
        train_steps=compile_train_steps(config, mesh, state_sharding),
        writer=writer,
        state_sharding=state_sharding,
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
            make_epoch_end_fn(self.model, self.config, self.mesh),
            out_shardings=repl,
            donate_argnums=1,
        ),
    )

  def device_epoch_program(self, loss_name: str) -> "Program":
    repl = parallel.replicated(self.mesh)
    # (state, models, step metrics, validation sums, improved)
    placed = (self.state_sharding, repl, repl, repl, repl)
    return self.program(
        f"the epoch on the device ({loss_name})",
        lambda: jax.jit(
            make_device_epoch_fn(self, loss_name), out_shardings=placed, donate_argnums=(0, 1)
        ),
    )

  def place_state(self, state):
    """A stacked train state (host arrays) on the devices, as the programs take it."""
    return parallel.place_host_values(state, self.state_sharding, "the train state")

  def new_state(self) -> TrainState:
    # The optimiser's init as one compiled program: run op by op it compiles
    # a small program for every parameter shape (1.3 s of a tiny CPU run's
    # start, more on a GPU); jitted, 0.2 s, and then cached.
    return state_from_variables(self.model, self.tx, self.initial_variables, self._optimizer_init)

  @functools.cached_property
  def _optimizer_init(self) -> Callable:
    """`tx.init` jitted once a job: traced once for all its folds."""
    return jax.jit(self.tx.init)


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
  # extras (`feeders._training_examples`): the epoch is as long as the smallest shard.
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

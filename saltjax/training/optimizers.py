"""Learning-rate schedules and optimisers: one registry each.

The code that builds them and `config_checks` read the same tables, so a
name accepted by the checks is a name the training can build.
"""

from __future__ import annotations

from typing import Callable

import optax

# name -> fn(optimizer config, learning-rate schedule) -> optax transformation
OPTIMIZERS: dict[str, Callable] = {
    "adam": lambda o, lr: optax.adam(lr),
    "adamw": lambda o, lr: optax.adamw(lr, weight_decay=o.weight_decay),
    "sgd": lambda o, lr: optax.sgd(lr, momentum=o.momentum, nesterov=o.nesterov),
    "rmsprop": lambda o, lr: optax.rmsprop(lr, momentum=o.momentum),
}
# Optimisers whose weight decay is decoupled inside them (the others get an L2 term).
_DECOUPLED_DECAY = ("adamw",)
# 'plateau' is a constant schedule times a learning-rate scale the host lowers.
SCHEDULES = ("cosine_restarts", "constant", "step", "plateau")


def cycle_end_epochs(config) -> list[int]:
  """Epoch counts at which a cosine cycle ends (a snapshot is kept there)."""
  s = config.schedule
  if s.name != "cosine_restarts":
    return []
  ends, length, end = [], float(s.cycle_epochs), float(s.warmup_epochs)
  while True:
    end += max(1, round(length))
    if end > config.num_epochs:
      return ends
    ends.append(int(end))
    length *= s.cycle_mult


def create_learning_rate_fn(config, steps_per_epoch: int) -> Callable:
  """The learning rate as a function of the step (optax schedules joined)."""
  s, base = config.schedule, config.optimizer.learning_rate
  warmup = s.warmup_epochs * steps_per_epoch
  if s.name == "cosine_restarts":
    # SGDR (Loshchilov & Hutter): cosine from base to min_lr, restarted at
    # every cycle end; cycles may grow by cycle_mult. The boundaries count
    # from the end of the warm-up: the join below already shifts this whole
    # schedule by `warmup` steps, so the restarts land on cycle_end_epochs.
    schedules, boundaries, length, total = [], [], float(s.cycle_epochs), 0
    starts = [0] + cycle_end_epochs(config)
    for i in range(len(starts) + 1):
      steps = max(1, round(length)) * steps_per_epoch
      schedules.append(optax.cosine_decay_schedule(base, steps, alpha=s.min_lr / base))
      total += steps
      boundaries.append(total)
      length *= s.cycle_mult
    main = optax.join_schedules(schedules, boundaries[:-1])
  elif s.name in ("constant", "plateau"):
    main = optax.constant_schedule(base)
  elif s.name == "step":
    main = optax.exponential_decay(
        base, s.step_epochs * steps_per_epoch, s.step_factor, staircase=True
    )
  else:
    raise ValueError(f"unknown config.schedule.name {s.name!r}: use {', '.join(SCHEDULES)}")
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(s.min_lr, base, warmup), main], [warmup])


def create_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
  o = config.optimizer
  if o.name not in OPTIMIZERS:
    raise ValueError(f"unknown config.optimizer.name {o.name!r}: use {', '.join(OPTIMIZERS)}")
  tx = OPTIMIZERS[o.name](o, learning_rate_fn)
  if o.weight_decay and o.name not in _DECOUPLED_DECAY:
    tx = optax.chain(optax.add_decayed_weights(o.weight_decay), tx)  # L2 penalty
  if o.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx

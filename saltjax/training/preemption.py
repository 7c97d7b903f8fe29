"""Preemption: SIGTERM asks training to save its resume point after the epoch and stop.

The decision to save and to stop is taken together by every process, once
an epoch.
"""

from __future__ import annotations

import threading
import time

import jax
import numpy as np

_STOP = threading.Event()


def request_stop() -> None:
  """Asks training to save its resume point after the current epoch and stop (SIGTERM)."""
  _STOP.set()


def agree_on_save_and_stop(config, group) -> tuple[bool, bool]:
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

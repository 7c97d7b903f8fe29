"""The process's set-up: logging, the compilation cache, a multi-host job's start, SIGTERM.

What `saltjax.app.run.main` does once, before the job: nothing here reads data
or builds a model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import platform
import signal
import sys
import warnings
from importlib import metadata

import jax

from saltjax import errors
from saltjax import workdir as workdir_lib

_PACKAGES = (
    "jax",
    "jaxlib",
    "libtpu",  # XLA's TPU compiler and runtime, where installed
    "flax",
    "optax",
    "orbax-checkpoint",
    "tensorflow-cpu",
    "tensorflow",
    "tensorflow-datasets",
    "ml-collections",
    "numpy",
    "opencv-python-headless",
    "scikit-learn",
)


def package_versions(names=_PACKAGES) -> dict:
  """Python's version and those of the named packages that are installed."""
  versions = {"python": platform.python_version()}
  for name in names:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return versions


def enable_compilation_cache(config) -> None:
  """JAX's persistent compilation cache: later folds and runs skip compiling."""
  cache = config.get("compilation_cache", "")
  if cache:
    cache = os.path.expanduser(cache)
    drop_unreadable_cache_entries(cache)
    jax.config.update("jax_compilation_cache_dir", cache)


# Cache entries already found readable, by name -> [size, mtime_ns]: JAX
# never rewrites an entry, so one that kept its size and time needs no second
# look. Without it every start decompressed the whole cache (0.12 CPU-s for
# the test suite's 151 tiny programs, more for full-size models' programs,
# paid by every process of a job).
VERIFIED_CACHE_ENTRIES = "saltjax-verified-entries.json"


def drop_unreadable_cache_entries(cache_dir: str) -> list[str]:
  """Deletes compilation-cache entries that cannot be decompressed.

  JAX writes an entry in place: a full disk or a kill leaves it truncated, and
  JAX then warns about it on every later run without replacing it. Deleted,
  it is compiled and written again. Entries found readable before (same size
  and modification time, recorded in VERIFIED_CACHE_ENTRIES) are not read
  again.
  """
  try:
    from jax._src import compilation_cache
  except ImportError:  # the layout of another JAX version: nothing checked
    return []
  if not os.path.isdir(cache_dir):
    return []
  record = pathlib.Path(cache_dir, VERIFIED_CACHE_ENTRIES)
  try:
    verified = json.loads(record.read_text())
  except (OSError, ValueError):
    verified = {}
  readable, dropped = {}, []
  for path in pathlib.Path(cache_dir).glob("*-cache"):
    try:
      stat = path.stat()
      signature = [stat.st_size, stat.st_mtime_ns]
      if verified.get(path.name) != signature:
        compilation_cache.decompress_executable(path.read_bytes())
    except OSError:
      continue
    except Exception:  # zlib/zstandard's errors for a truncated entry
      for stale in (path, path.with_name(path.name[: -len("-cache")] + "-atime")):
        with contextlib.suppress(OSError):
          stale.unlink()
      dropped.append(path.name)
      continue
    readable[path.name] = signature
  if readable != verified:
    # Best effort: a cache dir this process cannot write is still used.
    with contextlib.suppress(errors.WorkdirError):
      workdir_lib.write_text(json.dumps(readable, sort_keys=True), record)
  if dropped:
    logging.info("Deleted %d unreadable compilation-cache entries in %s", len(dropped), cache_dir)
  return dropped


def set_up_process() -> None:
  """Process-wide set-up, once, before any library does its work.

  TensorFlow is not imported here: `saltjax.host_tensorflow` sets it up where
  data is first read, so that a config error is reported in seconds.
  """
  logging.getLogger().setLevel(logging.INFO)
  # Orbax and TFDS report every file operation at INFO through absl, and
  # asyncio repeats a failed background write once per pending task.
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  logging.getLogger("absl").addFilter(_drop_orbax_background_errors)
  sys.unraisablehook = _quiet_closed_event_loops(sys.unraisablehook)
  warnings.filterwarnings("ignore", module="orbax")


def _drop_orbax_background_errors(record: logging.LogRecord) -> bool:
  """Orbax logs each failed background write (a traceback per array); the failure
  reaches the program as one error, which says what to do."""
  return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _quiet_closed_event_loops(hook):
  """Orbax's abandoned writes complain once per pending task after a failure."""

  def quiet(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
        unraisable.exc_value
    ):
      return
    hook(unraisable)

  return quiet


def initialize_distributed(config) -> None:
  """Joins this process to its multi-host job (`config.distributed=True`).

  `jax.distributed.initialize()` finds the job by itself on a Cloud TPU VM
  and under SLURM (SLURM_JOB_ID, SLURM_PROCID, SLURM_NTASKS, ...: every
  task of `srun` gets them); elsewhere JAX_COORDINATOR_ADDRESS (process 0's
  host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID say it. On CPU the
  processes' collectives go through gloo. A process lost later, or one that
  never joins, ends the others with exit status 75 (saltjax.app.host_loss).
  """
  from saltjax.app import host_loss

  try:
    host_loss.initialize(config)
  except errors.ConfigError:
    raise  # a bad timeout
  except (ValueError, RuntimeError) as e:
    raise errors.ConfigError(
        f"config.distributed=True, but this process could not join its job ({e})."
        " Run it under SLURM (srun) or on every host of a TPU pod slice, or set"
        " JAX_COORDINATOR_ADDRESS=<process 0's host>:<port>, JAX_NUM_PROCESSES and"
        " JAX_PROCESS_ID on each process"
    ) from e


@contextlib.contextmanager
def stop_training_on_sigterm():
  """SIGTERM, while it lasts, asks the training to save its resume point and stop."""
  previous = signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def _on_sigterm(signum, frame) -> None:
  from saltjax.training import preemption

  logging.warning("SIGTERM: saving the resume point after this epoch, then stopping.")
  preemption.request_stop()

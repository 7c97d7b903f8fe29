"""Every path a run writes (the README's "What a run writes" table), one atomic
writer, and the lock that keeps a workdir to one run at a time.

Model: big_vision's `utils.save_checkpoint_ts` — the code that writes a file
and the code that reads it ask this module where it is.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import secrets
import shutil
import socket
import time
from typing import Callable, Iterator

from saltjax.errors import WorkdirError

# Files at the top of a workdir.
CONFIG_JSON = "config.json"
VERSIONS_JSON = "versions.json"
FOLDS_CSV = "folds.csv"
SUBMISSION_CSV = "submission.csv"
OOF_CSV = "oof.csv"
SCORES_JSON = "scores.json"
GRAY_LEVELS_JSON = "gray_levels.json"  # the training images' gray levels (saltjax.data.gray_stats)
TENSORBOARD = "tensorboard"
PSEUDO_ROUND = "pseudo_round"
LOCK = ".lock"
# Inside fold_<k>/: one orbax store per kind of checkpoint, and the summary.
CHECKPOINT_STORES = ("latest", "best", "snapshots", "swa")
DONE_JSON = "done.json"


def fold_dir(workdir: pathlib.Path, fold: int) -> pathlib.Path:
  return pathlib.Path(workdir) / f"fold_{fold}"


def gray_levels_path(workdir: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir) / GRAY_LEVELS_JSON


def done_path(workdir: pathlib.Path, fold: int) -> pathlib.Path:
  return fold_dir(workdir, fold) / DONE_JSON


def read_done(workdir: pathlib.Path, fold: int) -> dict | None:
  """A finished fold's summary, or None while it is not finished."""
  path = done_path(workdir, fold)
  return json.loads(path.read_text()) if path.exists() else None


# ------------------------------------------------------------ atomic writes ---


def _disk_full(path) -> bool:
  """Whether the filesystem holding `path` (or its nearest existing parent) is full."""
  path = pathlib.Path(path)
  while not path.exists() and path != path.parent:
    path = path.parent
  try:
    return shutil.disk_usage(path).free < (1 << 20)
  except OSError:
    return False


def describe_os_error(e: OSError, path) -> str:
  """One sentence naming the path and what to do about the error.

  Some writers (OpenCV's PNG encoder) report a failure without an errno: a
  full disk is then recognised by the free space left.
  """
  if e.errno == errno.ENOSPC or (e.errno is None and _disk_full(path)):
    return f"no space left on the device holding {path}: free some space or use another --workdir"
  if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
    return (
        f"cannot write {path} ({os.strerror(e.errno)}): use a --workdir you can write"
        " to, or fix its permissions"
    )
  return f"cannot write {path}: {e.strerror or e}"


_TEMP_NAME = ".{name}.tmp-{pid}"


def write_atomic(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
  """`write(tmp)` under a hidden temporary name, then a rename into place.

  A reader never sees half a file; on any failure the temporary file is
  removed (a half-written one would keep a full disk full) and an OSError
  becomes a WorkdirError naming the path.
  """
  path = pathlib.Path(path)
  tmp = path.with_name(_TEMP_NAME.format(name=path.name, pid=os.getpid()))
  try:
    write(tmp)
    os.replace(tmp, path)
  except OSError as e:
    raise WorkdirError(describe_os_error(e, path)) from e
  finally:
    with contextlib.suppress(OSError):
      tmp.unlink()


def remove_temp_files(directory: pathlib.Path, pid: int) -> list[pathlib.Path]:
  """Deletes the temporary files of process `pid`'s writes under `directory`:
  those of a write cut short by the process's end (saltjax.app.host_loss)."""
  removed = []
  for tmp in pathlib.Path(directory).rglob(_TEMP_NAME.format(name="*", pid=pid)):
    with contextlib.suppress(OSError):
      tmp.unlink()
      removed.append(tmp)
  return removed


def write_text(text: str, path: pathlib.Path) -> None:
  write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(value, path: pathlib.Path) -> None:
  write_text(json.dumps(value, indent=1), path)


def write_csv(frame, path: pathlib.Path) -> None:
  """A pandas DataFrame as CSV, without the index."""
  write_text(frame.to_csv(index=False), path)


def check_writable(directory: pathlib.Path) -> None:
  """Finds out before any work whether `directory` can be created and written."""
  directory = pathlib.Path(directory)
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(describe_os_error(e, directory)) from e
  # Named for the process: the hosts of a multi-host job check at once.
  probe = directory / f".write-test-{socket.gethostname()}-{os.getpid()}"
  write_text("", probe)
  with contextlib.suppress(OSError):
    probe.unlink()


# ------------------------------------------------------------------- lock ---


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _take_lock(directory: pathlib.Path, me: dict) -> None:
  """Creates `directory/.lock` holding `me`, or raises WorkdirError naming its holder."""
  path = pathlib.Path(directory) / LOCK
  for _ in range(2):
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      try:
        holder = json.loads(path.read_text())
      except (OSError, ValueError):
        holder = {}
      if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
        with contextlib.suppress(FileNotFoundError):
          path.unlink()  # its holder died without releasing it
        continue
      raise WorkdirError(
          f"{directory} is in use by another run (PID {holder.get('pid', '?')} on host"
          f" {holder.get('host', '?')}, lock file {path}); wait for it to finish or use"
          " another --workdir. If that process is gone, delete the lock file."
      ) from None
    except OSError as e:
      raise WorkdirError(describe_os_error(e, path)) from e
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    return
  raise WorkdirError(f"could not take the lock {path}; try again")


def _holds_job(path: pathlib.Path, job: int, wait_s: float) -> bool:
  """Whether the lock file names `job`; a shared filesystem may show it late."""
  deadline = time.monotonic() + wait_s
  while True:
    try:
      if json.loads(path.read_text()).get("job") == job:
        return True
    except (OSError, ValueError):
      pass
    if time.monotonic() >= deadline:
      return False
    time.sleep(0.2)


@contextlib.contextmanager
def locked(
    directory: pathlib.Path,
    *,
    process_index: int = 0,
    allgather: Callable[[int], list[int]] | None = None,
    wait_s: float = 10.0,
) -> Iterator[None]:
  """Holds `directory/.lock` (holder's PID and host) for the duration of a run.

  A second run on the same workdir is refused at once, naming the holder; a
  lock whose holder is dead (same host, no such PID) is taken over.

  A multi-host job holds one lock, its process 0's: that process takes it
  with a random job number, and `allgather` (every process's int, in process
  order, on every process: a collective over the job's processes) hands the
  number to the others, which check that the lock file holds it. So every
  process of the job is let in, or every one gets the same refusal: another
  run holds the workdir, or some host does not see process 0's lock file
  (the workdir is not one directory shared by every host).
  """
  path = pathlib.Path(directory) / LOCK
  me = {"pid": os.getpid(), "host": socket.gethostname()}
  if allgather is None:
    _take_lock(directory, me)
  else:
    job, refused = 0, None
    if process_index == 0:
      try:
        me["job"] = secrets.randbelow(2**31 - 1) + 1  # 0 says: refused
        _take_lock(directory, me)
        job = me["job"]
      except WorkdirError as e:
        refused = e
    job = allgather(job)[0]
    sees_it = process_index == 0 or (job != 0 and _holds_job(path, job, wait_s))
    blind = [i for i, ok in enumerate(allgather(int(sees_it))) if not ok]
    if refused is not None:
      raise refused
    if job == 0:
      raise WorkdirError(
          f"{directory} is in use by another run: process 0 of this job could not take"
          f" {path} (its message names the holder); wait for that run to finish or use"
          " another --workdir"
      )
    if blind:
      if process_index == 0:
        with contextlib.suppress(OSError):
          path.unlink()
      raise WorkdirError(
          f"process(es) {', '.join(map(str, blind))} of this job do not see {path}, which"
          f" process 0 wrote: --workdir={directory} must be one directory that every host"
          " sees (an NFS or Filestore mount, or a gcsfuse mount of one bucket)"
      )
    if process_index != 0:
      yield  # process 0 holds the lock and releases it
      return
  try:
    yield
  finally:
    with contextlib.suppress(OSError):
      if json.loads(path.read_text()).get("pid") == me["pid"]:
        path.unlink()

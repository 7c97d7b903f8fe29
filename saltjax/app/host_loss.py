"""A multi-host job that loses a host: every other host stops in one line, exit 75.

A host of a pod slice or SLURM allocation can die without notice (kernel
panic, OOM kill, a VM taken back). JAX's coordination service (in process 0)
notices when its connection closes, or its heartbeats stop for
`config.distributed_heartbeat_timeout_seconds`, and tells the others, which
JAX then ends with a fatal log (a page of C++ frames) and an abort. Here each
of them instead prints one line naming the lost process (and host), the
workdir's last complete resume point and the command that resumes the job,
removes the temporary file of a write it was making, and exits 75
(EX_TEMPFAIL: "try again"), for the scheduler to retry; likewise when the
coordinator is lost, and when a process does not join within
`config.distributed_initialization_timeout_seconds`. docs/faults.md: what
survives, which timeouts to set.

The first of three watchers to know ends the process (`_report`), with
`os._exit` (JAX's exit path would wait in a barrier for the dead process):
- JAX's client, with our fatal-error callback (`_jax_fatal_errors_to`): it
  fires on a lost process, a lost coordinator and a join that timed out,
  within the timeouts whatever the collectives do (hung ones included);
- a watchdog thread that asks the service which processes are alive, every
  second: it names the lost ones, which the callback is not told;
- the main thread, where a collective with a dead peer raises (gloo):
  `hold_if_lost` keeps that error from ending the program first.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import logging
import os
import pathlib
import re
import shlex
import socket
import sys
import threading
import time
from typing import Callable, NoReturn

import jax

from saltjax import errors
from saltjax import workdir as workdir_lib

EXIT_TEMPFAIL = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, retry
HEARTBEAT_TIMEOUT_KEY = "distributed_heartbeat_timeout_seconds"
INITIALIZATION_TIMEOUT_KEY = "distributed_initialization_timeout_seconds"
# JAX's defaults (jax.distributed.initialize).
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
DEFAULT_INITIALIZATION_TIMEOUT_S = 300

_WATCH_EVERY_S = 1.0
# How long the callback waits for the watchdog to name the lost process (the
# service tells both at once), and how long the message may spend reading the
# workdir (a hung network filesystem must not hold the exit).
_VERDICT_WAIT_S = 5.0
_WORKDIR_READ_S = 10.0
_HOSTS_KEY = "saltjax/host/"


@dataclasses.dataclass
class _Job:
  heartbeat_s: int
  initialization_s: int
  phase: str = "joining"  # then "running", then "exiting" (normal exit under way)
  workdir: pathlib.Path | None = None
  hosts: dict[int, str] = dataclasses.field(default_factory=dict)
  lost: list[int] | None = None  # named by the watchdog
  named: threading.Event = dataclasses.field(default_factory=threading.Event)
  reporting: threading.Event = dataclasses.field(default_factory=threading.Event)


_job: _Job | None = None
_report_lock = threading.Lock()


# ------------------------------------------------------------ set-up ---


def timeouts(config) -> tuple[int, int]:
  """(heartbeat, initialization) timeouts in seconds; a ConfigError if not positive."""
  values = {}
  for key, default in (
      (HEARTBEAT_TIMEOUT_KEY, DEFAULT_HEARTBEAT_TIMEOUT_S),
      (INITIALIZATION_TIMEOUT_KEY, DEFAULT_INITIALIZATION_TIMEOUT_S),
  ):
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise errors.ConfigError(
          f"bad config:\n  config.{key}={value!r}: must be a whole number >= 1"
      )
    values[key] = value
  return values[HEARTBEAT_TIMEOUT_KEY], values[INITIALIZATION_TIMEOUT_KEY]


def initialize(config) -> None:
  """`jax.distributed.initialize` with the config's timeouts, then the watch.

  A process that cannot find its job (no cluster, no JAX_COORDINATOR_ADDRESS)
  gets JAX's ValueError or RuntimeError, as before; a job that does not
  gather within the initialization timeout ends here with exit 75.
  """
  global _job
  heartbeat_s, initialization_s = timeouts(config)
  _job = _Job(heartbeat_s, initialization_s, workdir=_job.workdir if _job is not None else None)
  try:
    with _jax_fatal_errors_to(_on_fatal_error):
      jax.distributed.initialize(
          initialization_timeout=initialization_s, heartbeat_timeout_seconds=heartbeat_s
      )
  except RuntimeError:
    # Versions of jaxlib that raise, rather than call back, when joining times
    # out: the client exists, so the job was found but did not gather.
    if _state() is not None and _state().client is not None:
      _report(_not_joined())
    raise
  _job.phase = "running"
  if jax.process_count() > 1:
    _job.hosts = _exchange_host_names()
    threading.Thread(target=_watch, name="saltjax-host-loss", daemon=True).start()
    # Registered after JAX's own exit handler, so run before it: a normal
    # exit's shutdown is not mistaken for a lost process.
    atexit.register(_exiting)


def set_workdir(workdir) -> None:
  """Where the message reads the resume point and removes temporary files."""
  global _job
  if _job is None:
    _job = _Job(DEFAULT_HEARTBEAT_TIMEOUT_S, DEFAULT_INITIALIZATION_TIMEOUT_S)
  _job.workdir = pathlib.Path(workdir)


def _exiting() -> None:
  if _job is not None:
    _job.phase = "exiting"


def hold_if_lost(error: BaseException) -> None:
  """In a multi-process job, lets a lost process end this one before `error` does.

  A collective whose peer died raises at once (gloo: "Connection closed by
  peer") while the coordination service may take up to the heartbeat
  timeout to tell: a JaxRuntimeError (or an error raised while handling one)
  waits that long for the verdict, and an error raised while a loss is being
  reported waits for that report to end the process. Otherwise it returns,
  and the error is reported as it would be anyway.
  """
  if _job is None or _job.phase == "joining" or jax.process_count() == 1:
    return
  if not _job.reporting.is_set() and _caused_by_runtime_error(error):
    logging.warning(
        "%s; waiting up to %d s for the coordination service to tell whether a process of the"
        " job was lost",
        _first_line(error),
        _job.heartbeat_s + 10,
    )
    _job.reporting.wait(_job.heartbeat_s + 10)
  if _job.reporting.is_set():
    time.sleep(_VERDICT_WAIT_S + _WORKDIR_READ_S + 30)  # the report ends the process
    _report(_lost_unnamed())


# The status codes jaxlib's errors start with (some arrive as ValueError) that
# a collective or barrier with a dead peer ends with.
_RUNTIME_FAILURE = re.compile(
    r"^(UNKNOWN|UNAVAILABLE|INTERNAL|ABORTED|CANCELLED|DEADLINE_EXCEEDED|DATA_LOSS"
    r"|FAILED_PRECONDITION): "
)


def _caused_by_runtime_error(error: BaseException | None) -> bool:
  """Whether `error`, or one it was raised while handling, is the runtime's."""
  seen = 0
  while error is not None and seen < 10:
    if isinstance(error, jax.errors.JaxRuntimeError) or _RUNTIME_FAILURE.match(str(error)):
      return True
    error, seen = error.__cause__ or error.__context__, seen + 1
  return False


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:200] if text else ''}"


# ------------------------------------------------------- what JAX says ---


def _state():
  """JAX's record of this process's job (its client, coordinator, process id and count).

  Private (jax._src.distributed.global_state; checked on jax 0.10.2): no
  public API gives the coordinator's address, nor the client whose
  `get_live_nodes` says which processes are alive. None where it moved.
  """
  try:
    from jax._src import distributed
  except ImportError:
    return None
  return getattr(distributed, "global_state", None)


def _num_processes() -> int:
  return int(getattr(_state(), "num_processes", 0) or 0)


def _process_index() -> int:
  return int(getattr(_state(), "process_id", 0) or 0)


def _coordinator() -> str:
  return getattr(_state(), "coordinator_address", None) or "?"


@contextlib.contextmanager
def _jax_fatal_errors_to(callback: Callable[..., None]):
  """Within: the distributed client JAX creates calls `callback` on a fatal error.

  jax.distributed.initialize creates its client without a callback, and the
  client's default ends the process with a fatal log (a page of C++ frames)
  and an abort. jaxlib's client factory takes one (`missed_heartbeat_callback`),
  and this hands ours to it while JAX creates the client. Checked on
  jax/jaxlib 0.10.2, where two things are private or broken, so it stays in
  this one function:
  - the factory is private: jax._src.distributed calls
    jax._src.lib._jax.get_distributed_runtime_client, patched here for the
    call's duration;
  - a Python callback is never called: jaxlib cannot convert its argument (an
    absl::Status) to Python and throws std::bad_cast from the client's
    thread, which ends in std::terminate. So `callback` is also this
    process's std::terminate handler for that exception (libstdc++'s
    std::set_terminate, through ctypes); any other exception goes on to the
    previous handler, as before. Where jaxlib converts the status, the
    callback is called with it.
  Where either step cannot be taken, JAX's default stays.
  """
  try:
    from jax._src import distributed
  except ImportError:
    distributed = None
  lib = getattr(distributed, "_jax", None)
  factory = getattr(lib, "get_distributed_runtime_client", None)
  if factory is None or not _terminate_calls(callback):
    yield
    return

  def with_callback(*args, **kwargs):
    kwargs.setdefault("missed_heartbeat_callback", callback)
    return factory(*args, **kwargs)

  lib.get_distributed_runtime_client = with_callback
  try:
    yield
  finally:
    lib.get_distributed_runtime_client = factory


_TERMINATE_HANDLER = ctypes.CFUNCTYPE(None)
_terminate_handlers: list = []  # kept alive: C++ holds their addresses


def _terminate_calls(callback: Callable[..., None]) -> bool:
  """std::terminate on a std::bad_cast calls `callback` (see _jax_fatal_errors_to).

  libstdc++ (Linux) only; False where it cannot be set. The exception's type
  is read from its std::type_info (Itanium C++ ABI: the name follows the
  vtable pointer).
  """
  try:
    libstdcxx = ctypes.CDLL("libstdc++.so.6")
    set_terminate = libstdcxx._ZSt13set_terminatePFvvE
    current_exception_type = libstdcxx.__cxa_current_exception_type
  except (OSError, AttributeError):
    return False
  set_terminate.restype = ctypes.c_void_p
  set_terminate.argtypes = [_TERMINATE_HANDLER]
  current_exception_type.restype = ctypes.c_void_p
  previous: list = []

  def on_terminate():
    info, name = None, b""
    try:
      info = current_exception_type()
      name = ctypes.c_char_p.from_address(info + ctypes.sizeof(ctypes.c_void_p)).value or b""
    except Exception:  # noqa: BLE001 (nothing may escape into C++)
      pass
    if info and (b"bad_cast" in name or b"cast_error" in name):
      callback()
    if previous:
      previous[0]()  # libstdc++'s: prints the exception, aborts
    os.abort()

  handler = _TERMINATE_HANDLER(on_terminate)
  _terminate_handlers.append(handler)
  old = set_terminate(handler)
  if old:
    previous.append(_TERMINATE_HANDLER(old))
  return True


def _exchange_host_names() -> dict[int, str]:
  """{process: host name} of every process, through the coordination service's store."""
  state, n = _state(), jax.process_count()
  client = getattr(state, "client", None)
  if client is None:
    return {}
  try:
    client.key_value_set(f"{_HOSTS_KEY}{jax.process_index()}", socket.gethostname())
    timeout_ms = 1000 * _job.initialization_s
    return {i: client.blocking_key_value_get(f"{_HOSTS_KEY}{i}", timeout_ms) for i in range(n)}
  except Exception as e:  # noqa: BLE001 (names are a courtesy; the job goes on)
    logging.warning("Could not learn the other processes' host names (%s)", _first_line(e))
    return {}


# ------------------------------------------------------- the watchers ---


def _on_fatal_error(status=None) -> None:
  """JAX's client reports a fatal error (see _jax_fatal_errors_to); ends the process."""
  try:
    if _job is None or _job.phase == "joining":
      _report(_not_joined())
    _job.reporting.set()
    _job.named.wait(_VERDICT_WAIT_S)  # the watchdog learns it at the same moment
    if _job.lost:
      _report(_lost(_job.lost))
    if _process_index() != 0 and not _reachable(_coordinator()):
      _report(_lost([0]))
    _report(_lost_unnamed(status))
  finally:
    os._exit(EXIT_TEMPFAIL)  # nothing may return into JAX's fatal path


def _watch() -> None:
  """Asks the coordination service, every second, which processes are alive.

  `get_live_nodes` returns once every live process has asked (a barrier over
  the live ones): each process's watchdog asks, and a dead process drops out
  of the answer as soon as the service counts it dead.
  """
  client, n, me = _state().client, _num_processes(), _process_index()
  unreachable_since = None
  while _job.phase == "running":
    try:
      live = client.get_live_nodes(list(range(n)))
    except Exception:  # noqa: BLE001 (the RPC's errors come in many types)
      if _job.phase != "running":
        return
      if me != 0 and not _reachable(_coordinator()):
        _name_lost([0])
      unreachable_since = unreachable_since or time.monotonic()
      if time.monotonic() - unreachable_since > _job.heartbeat_s:
        _report(_lost_unnamed("the coordination service stopped answering"))
      time.sleep(_WATCH_EVERY_S)
      continue
    unreachable_since = None
    if _job.phase != "running":
      return
    lost = sorted(set(range(n)) - set(live))
    if lost and me in live:
      _name_lost(lost)
    time.sleep(_WATCH_EVERY_S)


def _name_lost(lost: list[int]) -> NoReturn:
  _job.lost = lost
  _job.named.set()
  _report(_lost(lost))


def _reachable(address: str, timeout_s: float = 2.0) -> bool:
  """Whether something accepts connections at host:port (the coordinator's port)."""
  host, _, port = address.rpartition(":")
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
      return True
  except (OSError, ValueError):
    return False


# ------------------------------------------------------------ the report ---


def _processes(ids: list[int]) -> str:
  named = [
      f"{i} (host {_job.hosts[i]})" if _job is not None and i in _job.hosts else str(i) for i in ids
  ]
  return ("process " if len(ids) == 1 else "processes ") + ", ".join(named)


def _lost(ids: list[int]) -> str:
  what = _processes(ids)
  if 0 in ids:
    what += f", the coordinator at {_coordinator()},"
  return f"lost {what} of this {_num_processes()}-process job"


def _lost_unnamed(detail=None) -> str:
  """The loss as far as this process can tell without the watchdog's answer."""
  n, me = _num_processes(), _process_index()
  others = [i for i in range(n) if i not in (me, 0)]
  if me == 0 or _reachable(_coordinator()):
    if len(others) == 1:
      return _lost(others)
    suspects = f" (one or more of {_processes(others)})" if others else ""
    text = f"lost a process of this {n}-process job{suspects}"
  else:
    text = _lost([0])
  if detail:
    text += f" ({str(detail).strip().splitlines()[0][:200]})"
  return text


def _not_joined() -> str:
  n, me, coordinator = _num_processes(), _process_index(), _coordinator()
  timeout = f"{_job.initialization_s} s" if _job is not None else "the timeout"
  key = f"config.{INITIALIZATION_TIMEOUT_KEY}"
  if me != 0 and not _reachable(coordinator):
    return (
        f"process 0, the coordinator at {coordinator}, did not start or cannot be reached from"
        f" this host (process {me} of {n}) within {timeout} ({key})"
    )
  missing = [i for i in range(n) if i not in (me, 0)]
  who = _processes(missing) if len(missing) == 1 else f"one or more of {_processes(missing)}"
  return (
      f"{who} did not join this {n}-process job within {timeout} ({key}; the coordinator at"
      f" {coordinator}, process 0, is up)"
  )


def describe_resume_point(workdir: pathlib.Path | None) -> str:
  """The workdir's last complete resume point, read from its directory names alone."""
  from saltjax import checkpoints as ckpt_lib  # orbax: already loaded by training

  if workdir is None:
    return "nothing saved yet"
  parts = []
  for round_dir, label in ((workdir, ""), (workdir / workdir_lib.PSEUDO_ROUND, "pseudo-label ")):
    fold_dirs = [p for p in round_dir.glob("fold_*") if p.name[5:].isdigit()]
    for fold_dir in sorted(fold_dirs, key=lambda p: int(p.name[5:])):
      fold = int(fold_dir.name[5:])
      if (fold_dir / workdir_lib.DONE_JSON).is_file():
        parts.append(f"{label}fold {fold} finished")
        continue
      epoch = ckpt_lib.last_complete_epoch(fold_dir)
      parts.append(f"{label}fold {fold} " + (f"epoch {epoch}" if epoch else "not started"))
  if not parts:
    return f"nothing saved yet in {workdir}"
  return f"the last complete resume point in {workdir}: {', '.join(parts)}"


def _resume_command() -> str:
  argv = list(sys.argv)
  if argv and argv[0].endswith(".py"):
    argv = ["python", *argv]
  return shlex.join(argv)


def _within(seconds: float, fn: Callable[[], str], default: str) -> str:
  """fn() on a thread, or `default` when it takes longer (a hung filesystem)."""
  out = [default]
  thread = threading.Thread(target=lambda: out.__setitem__(0, fn()), daemon=True)
  thread.start()
  thread.join(seconds)
  return out[0]


def _read_workdir() -> str:
  workdir = _job.workdir if _job is not None else None
  if workdir is not None:
    workdir_lib.remove_temp_files(workdir, os.getpid())
  return describe_resume_point(workdir)


def _report(what: str) -> NoReturn:
  """Prints the one line and ends the process with EXIT_TEMPFAIL; once per process."""
  if not _report_lock.acquire(blocking=False):
    while True:  # another thread is reporting, and ends the process
      time.sleep(60)
  try:
    if _job is not None:
      _job.reporting.set()
    resume = _within(_WORKDIR_READ_S, _read_workdir, "the workdir could not be read")
    line = (
        f"error: {what}; {resume}; start every process again with the same command to resume:"
        f" {_resume_command()} (exit status {EXIT_TEMPFAIL}: a temporary failure, retry)\n"
    )
    for stream in (sys.stdout, sys.stderr):
      with contextlib.suppress(Exception):
        stream.flush()
    os.write(2, line.encode())
  finally:
    os._exit(EXIT_TEMPFAIL)

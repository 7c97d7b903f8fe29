"""The workdir: one atomic writer, disk and permission errors, one run at a time."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from saltjax import errors
from saltjax import workdir as workdir_lib
from tests.conftest import tiny_config


def test_atomic_writer_leaves_no_temp_file_and_names_the_path_when_the_disk_is_full(tmp_path):
  target = tmp_path / "scores.json"

  def half_then_full(tmp: pathlib.Path):
    tmp.write_text('{"half": ')  # what a full disk leaves behind
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  with pytest.raises(errors.WorkdirError) as raised:
    workdir_lib.write_atomic(target, half_then_full)
  assert f"no space left on the device holding {target}" in str(raised.value)
  assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_read_only_errors_say_what_to_do(tmp_path):
  def read_only(tmp):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

  with pytest.raises(errors.WorkdirError, match="use a --workdir you can write to"):
    workdir_lib.write_atomic(tmp_path / "x.csv", read_only)


def test_the_lock_refuses_a_second_run_and_names_the_holder(tmp_path):
  with workdir_lib.locked(tmp_path):
    held = json.loads((tmp_path / workdir_lib.LOCK).read_text())
    assert held == {"pid": os.getpid(), "host": socket.gethostname()}
    with pytest.raises(errors.WorkdirError) as raised:
      with workdir_lib.locked(tmp_path):
        pass
    assert f"PID {os.getpid()} on host {socket.gethostname()}" in str(raised.value)
  assert not (tmp_path / workdir_lib.LOCK).exists()  # released on exit


def test_the_lock_of_a_dead_holder_is_taken_over(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / workdir_lib.LOCK).write_text(
      json.dumps({"pid": dead.pid, "host": socket.gethostname()})
  )
  with workdir_lib.locked(tmp_path):
    assert json.loads((tmp_path / workdir_lib.LOCK).read_text())["pid"] == os.getpid()
  assert not (tmp_path / workdir_lib.LOCK).exists()


class _Job:
  """The processes of one multi-host job as threads: `allgather` is a collective."""

  def __init__(self, num_processes: int):
    import threading

    self.n = num_processes
    self._barrier = threading.Barrier(num_processes, timeout=30)
    self._values = [None] * num_processes

  def allgather_of(self, i: int):
    def allgather(value: int) -> list[int]:
      self._values[i] = value
      self._barrier.wait()
      out = list(self._values)
      self._barrier.wait()  # every process read before the next call writes
      return out

    return allgather

  def run(self, directories, body=lambda i: None) -> list:
    """locked() on each process (process i on directories[i]); each one's result or error."""
    import concurrent.futures

    def process(i):
      try:
        with workdir_lib.locked(
            directories[i], process_index=i, allgather=self.allgather_of(i), wait_s=0.5
        ):
          return body(i)
      except errors.WorkdirError as e:
        return e

    with concurrent.futures.ThreadPoolExecutor(self.n) as pool:
      return list(pool.map(process, range(self.n)))


def test_a_multi_host_job_holds_one_lock_taken_by_process_0(tmp_path):
  lock = tmp_path / workdir_lib.LOCK
  seen = {}
  job = _Job(2)

  def body(i):
    seen[i] = json.loads(lock.read_text())
    job.allgather_of(i)(0)  # neither leaves (process 0 releasing) before both have read

  results = job.run([tmp_path, tmp_path], body)
  assert results == [None, None]  # both processes of the job were let in
  assert seen[0] == seen[1]
  assert seen[0]["pid"] == os.getpid() and seen[0]["job"] > 0
  assert not lock.exists()  # released by process 0


def test_a_multi_host_job_is_refused_on_every_process_when_the_workdir_is_in_use(tmp_path):
  with workdir_lib.locked(tmp_path):  # another run
    results = _Job(2).run([tmp_path, tmp_path])
  assert all(isinstance(r, errors.WorkdirError) for r in results)
  assert f"PID {os.getpid()} on host {socket.gethostname()}" in str(results[0])
  assert "in use by another run: process 0 of this job could not take" in str(results[1])


def test_a_workdir_that_a_host_does_not_see_is_refused_on_every_process(tmp_path):
  """Process 1's --workdir is another directory than process 0's (not shared)."""
  shared, elsewhere = tmp_path / "shared", tmp_path / "local"
  shared.mkdir()
  elsewhere.mkdir()
  results = _Job(2).run([shared, elsewhere])
  assert all(isinstance(r, errors.WorkdirError) for r in results)
  for r in results:
    assert "process(es) 1 of this job do not see" in str(r)
    assert "must be one directory that every host sees" in str(r)
  assert not (shared / workdir_lib.LOCK).exists() and not (elsewhere / workdir_lib.LOCK).exists()


def test_any_config_takes_distributed_and_says_how_to_start_a_job(tmp_path):
  """--config.distributed=True is a key of every config (configs/fold.py's);
  outside a cluster it ends in one message saying how to start each process."""
  from tests.conftest import REPO

  env = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
  }
  result = subprocess.run(
      [
          sys.executable,
          str(REPO / "main.py"),
          "--config=configs/quick.py",
          "--config.distributed=True",
          f"--workdir={tmp_path / 'run'}",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env={**env, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert "error: config.distributed=True, but this process could not join its job" in result.stderr
  assert "JAX_COORDINATOR_ADDRESS" in result.stderr and "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()


def test_main_refuses_a_workdir_in_use_before_writing_anything(
    tmp_path, data_cache, compile_cache, capfd, monkeypatch
):
  from saltjax.app import run

  monkeypatch.delenv("SALTJAX_DEBUG", raising=False)
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / workdir_lib.LOCK).write_text(
        json.dumps({"pid": holder.pid, "host": socket.gethostname()})
    )
    config = tiny_config(data_cache, compile_cache, fold=0)
    assert run.main(config, str(workdir)) == 1
    err = capfd.readouterr().err
    assert f"is in use by another run (PID {holder.pid}" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in workdir.iterdir()) == [workdir_lib.LOCK]
  finally:
    holder.kill()
    holder.wait()


def _mount_tmpfs(path: pathlib.Path, options: str) -> bool:
  path.mkdir(parents=True, exist_ok=True)
  result = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
  )
  return result.returncode == 0


@pytest.fixture
def small_mount(tmp_path):
  """Mounts tmpfs filesystems for the test (where this machine lets the tests)."""
  mounted = []

  def mount(name: str, options: str) -> pathlib.Path:
    path = tmp_path / name
    if not _mount_tmpfs(path, options):
      pytest.skip("mounting a tmpfs is not permitted here")
    mounted.append(path)
    return path

  yield mount
  for path in mounted:
    subprocess.run(["umount", str(path)], capture_output=True)


def test_a_read_only_workdir_is_found_before_training(
    small_mount, data_cache, compile_cache, capfd, monkeypatch
):
  from saltjax.app import run

  monkeypatch.delenv("SALTJAX_DEBUG", raising=False)
  workdir = small_mount("ro", "ro,size=1m") / "run"
  config = tiny_config(data_cache, compile_cache, fold=0)
  assert run.main(config, str(workdir)) == 1
  err = capfd.readouterr().err
  assert f"cannot write {workdir}" in err and "Read-only file system" in err
  assert "Traceback" not in err


def test_a_full_disk_during_training_ends_in_one_message(
    small_mount, data_cache, compile_cache, capfd, monkeypatch
):
  """Room for the run's records but not its checkpoints: one message, exit 1."""
  from saltjax.app import process
  from saltjax.app import run

  monkeypatch.delenv("SALTJAX_DEBUG", raising=False)
  workdir = small_mount("full", "size=64k") / "run"
  config = tiny_config(data_cache, compile_cache, fold=0)
  process.enable_compilation_cache(config)
  assert run.main(config, str(workdir)) == 1
  err = capfd.readouterr().err
  assert "error: " in err
  assert "no space left" in err.lower() or "No space left" in err
  assert "Traceback" not in err
  assert len(err.splitlines()) < 40, err[-3000:]
  # No temporary file is left to keep the disk full.
  assert not [p for p in workdir.rglob("*") if ".tmp-" in p.name]


def test_truncated_compilation_cache_entries_are_dropped(tmp_path, monkeypatch):
  """A full disk leaves a truncated cache entry that JAX would warn about on every
  run: it is deleted (and compiled again), the intact ones are kept. An entry
  found readable is not read again at the next start unless it changed."""
  from jax._src import compilation_cache

  from saltjax.app import process

  whole = compilation_cache.compress_executable(b"x" * 10_000)
  (tmp_path / "good-cache").write_bytes(whole)
  (tmp_path / "cut-cache").write_bytes(whole[: len(whole) // 2])
  (tmp_path / "cut-atime").write_bytes(b"1")
  assert process.drop_unreadable_cache_entries(str(tmp_path)) == ["cut-cache"]
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      ["good-cache", process.VERIFIED_CACHE_ENTRIES]
  )

  read = []
  decompress = compilation_cache.decompress_executable
  monkeypatch.setattr(
      compilation_cache, "decompress_executable", lambda b: read.append(len(b)) or decompress(b)
  )
  (tmp_path / "new-cache").write_bytes(whole)
  assert process.drop_unreadable_cache_entries(str(tmp_path)) == []
  assert read == [len(whole)]  # the new entry only
  # An entry that is not what was found readable is read again: here a
  # good one cut short (its size changed).
  (tmp_path / "good-cache").write_bytes(whole[:10])
  assert process.drop_unreadable_cache_entries(str(tmp_path)) == ["good-cache"]
  assert read == [len(whole), 10]
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      ["new-cache", process.VERIFIED_CACHE_ENTRIES]
  )


def test_a_full_cache_dir_says_so(small_mount, tmp_path, compile_cache, capfd, monkeypatch):
  """The embedded dataset cannot be generated into a full cache_dir: one message
  naming it and the option, and no half-written dataset left behind."""
  from saltjax.app import run

  monkeypatch.delenv("SALTJAX_DEBUG", raising=False)
  cache = small_mount("cache", "size=64k")
  config = tiny_config(str(cache), compile_cache, fold=0)
  assert run.main(config, str(tmp_path / "run")) == 1
  err = capfd.readouterr().err
  assert f"no space left on the device holding {cache}" in err
  assert "--config.cache_dir" in err and "Traceback" not in err
  assert not [p for p in cache.rglob("*") if ".tmp-" in p.name]
  assert not (tmp_path / "run").exists()


def test_abandoned_tfds_preparations_and_stale_copies_are_removed(tmp_path):
  from saltjax.data import tfds_builders

  target = tmp_path / "tfds" / "data-new"
  old = target / "tgs_salt" / "incomplete.abc"
  fresh = target / "tgs_salt" / "incomplete.def"
  for path in (old, fresh):
    path.mkdir(parents=True)
  os.utime(old, (0, 0))  # untouched since 1970: its process is long gone
  tfds_builders._remove_abandoned_preparations(target)
  assert not old.exists() and fresh.exists()  # another process may be writing that one

  source = tmp_path / "data"
  source.mkdir()
  stale, other = tmp_path / "tfds" / "data-old", tmp_path / "tfds" / "else-1"
  for path, origin in ((stale, source), (other, tmp_path / "elsewhere")):
    path.mkdir(parents=True)
    (path / "source.txt").write_text(str(origin.resolve()))
  tfds_builders._forget_older_copies(tmp_path, source, target)
  assert not stale.exists()  # an earlier state of the same directory
  assert other.exists()  # another directory's copy
  assert (target / "source.txt").read_text() == str(source.resolve())

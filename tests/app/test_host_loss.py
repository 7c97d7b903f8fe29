"""A pod job through main.py: preempted, or losing a host, it stops everywhere at once and resumes.

Two processes of `python main.py --config=configs/tpu.py` at tiny sizes on one
workdir, each with the environment SLURM gives a task of `srun` (JAX finds the
job from it: the coordinator is the first node of SLURM_STEP_NODELIST, its port
derived from SLURM_JOB_ID), gloo CPU collectives, the optimiser's moments split
over both processes' devices, a resume point every epoch, and small timeouts:
heartbeat 10 s, initialization 20 s.

One job, started four times with the same two commands:
- process 1 alone gets SIGTERM in epoch 1: both processes save the same
  resume point and exit 143 within a minute;
- relaunched, it resumes from epoch 1, and process 0, the coordinator, kills
  itself with SIGKILL in epoch 2: process 1 exits 75 within the heartbeat
  timeout + 30 s, with one line naming process 0 and the command; no
  traceback, no C++ frames;
- relaunched, it resumes from epoch 1, and process 1 kills itself in epoch 3,
  past the next resume point: process 0 exits 75 the same way, naming process
  1 and the resume point on disk (epoch 2); no temporary file is left;
- relaunched again, it finishes: every epoch recorded once, the files written
  by process 0 alone, and the scores, submission and out-of-fold file of a
  job never interrupted (the reference, run first: it compiles what the
  others load).
- A job whose process 1 (or 0) never starts: the other gives up after the
  initialization timeout, naming the missing process and the coordinator.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
NUM_PROCESSES = 2
POD_EPOCHS = 3
HEARTBEAT_S, INITIALIZATION_S = 10, 20
STOP_WITHIN_S = HEARTBEAT_S + 30  # after a lost host
SIGTERM_STOP_WITHIN_S = 60  # after SIGTERM: the epoch is finished and saved first
# Survivors still running this long after the fault hang (the fault these tests find).
HUNG_AFTER_S = SIGTERM_STOP_WITHIN_S + 60
# Each process compiles the tiny model's programs for the reference (~150 s on
# 2 busy cores); the others load them.
RUN_TIMEOUT_S = 1200

# Prepended to the jobs' hook. JAX writes its persistent compilation cache from
# process 0 only, and on the CPU each process's cache key differs (the compile
# options and topology it hashes name its own devices), so process 1 compiled
# every program again at each launch of the same tiny job: about 45 s a launch,
# with process 0 waiting for it. Here each process writes its own entries (a
# TPU pod's hosts share one key, and process 0's entries).
EVERY_PROCESS_WRITES_THE_COMPILATION_CACHE = """
from jax._src import compilation_cache as _compilation_cache
from jax._src import compiler as _compiler
from jax._src import distributed as _distributed
_cache_write = _compiler._cache_write

def _every_process_cache_write(cache_key, compile_time_secs, module_name, backend, executable,
                               host_callbacks):
  if _distributed.global_state.process_id != 0 and not host_callbacks:
    _compilation_cache.put_executable_and_time(
        cache_key, module_name, executable, backend, int(compile_time_secs))
  else:
    _cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)

_compiler._cache_write = _every_process_cache_write
"""

# main.py with every workdir write recorded (which process, which file); where
# FAULT_AT says so, FAULT_SIGNAL (SIGKILL or SIGTERM) to this process when that
# epoch's batch (0-based epoch, batch) is handed to the train step, once the
# directories in FAULT_AFTER exist; the time when it starts to join the job.
_HOOK = """
import json, os, runpy, signal, sys, time
from saltjax import workdir

def mark(path):
  with open(path + ".tmp", "w") as f:
    f.write(repr(time.time()))
  os.replace(path + ".tmp", path)

written = workdir.write_atomic

def write_atomic(path, write):
  import jax
  with open(os.environ["WRITES_LOG"], "a") as f:
    f.write(json.dumps([jax.process_index(), str(path)]) + "\\n")
  return written(path, write)

workdir.write_atomic = write_atomic
if os.environ.get("FAULT_AT"):
  from saltjax.input_pipeline import tfdata
  at = tuple(map(int, os.environ["FAULT_AT"].split(",")))
  original = tfdata.epoch_iterator

  def epoch_iterator(for_epoch, epoch, skip_batches=0):
    for i, batch in enumerate(original(for_epoch, epoch, skip_batches)):
      if (epoch, i) == at and not os.path.exists(os.environ["FAULT"]):
        # Once the resume points named in FAULT_AFTER are complete (orbax
        # writes them in the background), so that every fold resumes from one
        # epoch: folds resumed from different ones train apart, which moves
        # the float rounding of the fold axis (docs/faults.md).
        deadline = time.time() + 120
        wanted = [p for p in os.environ.get("FAULT_AFTER", "").split(",") if p]
        while time.time() < deadline and not all(map(os.path.isdir, wanted)):
          time.sleep(0.1)
        mark(os.environ["FAULT"])
        os.kill(os.getpid(), getattr(signal, os.environ["FAULT_SIGNAL"]))
      yield batch

  tfdata.epoch_iterator = epoch_iterator
import jax
initialize = jax.distributed.initialize

def timed_initialize(*args, **kwargs):
  mark(os.environ["JOINING"])
  return initialize(*args, **kwargs)

jax.distributed.initialize = timed_initialize
sys.argv[0] = "main.py"
runpy.run_path("main.py", run_name="__main__")
"""


def _slurm_job_id() -> int:
  """A job id whose coordinator port (as JAX derives it under SLURM) is free here."""
  rng = np.random.default_rng()
  for _ in range(200):
    job = int(rng.integers(1, 10**6))
    port = job % 2**12 + (65535 - 2**12 + 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
    return job
  raise RuntimeError("no free port for the coordinator")


def _args(workdir, data_cache, compile_cache) -> list[str]:
  from tests.conftest import flag_args

  return [
      "--config=configs/tpu.py",
      f"--workdir={workdir}",
      f"--config.cache_dir={data_cache}",
      f"--config.compilation_cache={compile_cache}",
      *flag_args(
          **{
              "num_epochs": POD_EPOCHS,
              "model.pretrained": "",
              "model.dtype": "float32",
              "schedule.warmup_epochs": 0,
              "checkpoint_every_seconds": 0,  # a resume point every epoch
              # The optimiser's moments split over both processes' devices:
              # saving and resuming read them whole on every host.
              "state_sharding": "optimizer",
              "distributed_heartbeat_timeout_seconds": HEARTBEAT_S,
              "distributed_initialization_timeout_seconds": INITIALIZATION_S,
          }
      ),
  ]


def _run(
    args,
    out: pathlib.Path,
    fault: tuple[int, str, str] | None = None,
    fault_after=(),
    start=(0, 1),
) -> dict:
  """The processes `start` of one two-process job.

  fault: (process, "epoch,batch", "SIGKILL" or "SIGTERM") to send, once the
  directories `fault_after` exist.
  """
  out.mkdir(parents=True, exist_ok=True)
  job, procs, logs = _slurm_job_id(), {}, {}
  for i in start:
    env = dict(os.environ)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO),
        TF_CPP_MIN_LOG_LEVEL="2",
        # What `srun --ntasks=2` gives each task (one node, here).
        SLURM_JOB_ID=str(job),
        SLURM_STEP_NODELIST="127.0.0.1",
        SLURM_STEP_NUM_NODES="1",
        SLURM_NTASKS=str(NUM_PROCESSES),
        SLURM_PROCID=str(i),
        SLURM_LOCALID=str(i),
        SLURM_NODEID="0",
        FAULT=str(out / "fault"),
        JOINING=str(out / f"joining_{i}"),
        WRITES_LOG=str(out / f"writes_{i}.jsonl"),
    )
    if fault is not None and fault[0] == i:
      env.update(
          FAULT_AT=fault[1], FAULT_SIGNAL=fault[2], FAULT_AFTER=",".join(map(str, fault_after))
      )
    logs[i] = open(out / f"process_{i}.log", "w")
    procs[i] = subprocess.Popen(
        [sys.executable, "-c", EVERY_PROCESS_WRITES_THE_COMPILATION_CACHE + _HOOK, *args],
        cwd=REPO,
        env=env,
        stdout=logs[i],
        stderr=subprocess.STDOUT,
    )
  deadline, ended = time.time() + RUN_TIMEOUT_S, {}
  fault_file = out / "fault"
  try:
    while len(ended) < len(procs) and time.time() < deadline:
      for i, p in procs.items():
        if i not in ended and p.poll() is not None:
          ended[i] = time.time()
      if fault_file.exists() and time.time() - float(fault_file.read_text()) > HUNG_AFTER_S:
        break
      time.sleep(0.2)
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in logs.values():
      f.close()
  joining = {i: out / f"joining_{i}" for i in start}
  writes = []
  for i in start:
    path = out / f"writes_{i}.jsonl"
    writes += (
        [tuple(json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []
    )
  return {
      "rc": {i: p.returncode for i, p in procs.items()},
      "ended": ended,
      "logs": {i: (out / f"process_{i}.log").read_text() for i in start},
      "fault_at": float(fault_file.read_text()) if fault_file.exists() else None,
      "joining": {i: float(p.read_text()) for i, p in joining.items() if p.exists()},
      "writes": writes,
  }


def _tails(run) -> str:
  return "".join(
      f"\n--- process {i} (exit {run['rc'][i]}) ---\n{log[-3000:]}"
      for i, log in run["logs"].items()
  )


def _error_lines(log: str) -> list[str]:
  return [line for line in log.splitlines() if line.startswith("error: ")]


def _disk_resume_point(workdir: pathlib.Path) -> dict[int, int]:
  return {
      k: max(
          (int(p.name) for p in (workdir / f"fold_{k}" / "latest").iterdir() if p.name.isdigit()),
          default=0,
      )
      for k in (0, 1)
  }


def _leftovers(workdir: pathlib.Path) -> list[str]:
  """Temporary files of an interrupted write (ours, or orbax's unfinished saves)."""
  return sorted(
      str(p.relative_to(workdir))
      for p in workdir.rglob("*")
      if ".tmp-" in p.name or "orbax-checkpoint-tmp" in p.name
  )


def _assert_clean_stop(log: str) -> None:
  for junk in ("Traceback", "Check failure stack trace", "terminate called", "core dumped"):
    assert junk not in log, junk


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, prepared_data, data_cache, compile_cache):
  """The reference job, then one job preempted, stopped twice by a lost process, finished."""
  root = tmp_path_factory.mktemp("pod")
  # While the reference compiles, two jobs that never gather wait out their
  # initialization timeout: one without process 1, one without process 0.
  never = {}

  def never_joined(missing):
    started = [i for i in range(NUM_PROCESSES) if i != missing]
    never[missing] = _run(
        _args(root / f"never_{missing}", data_cache, compile_cache),
        root / f"never_{missing}_out",
        start=started,
    )

  waiting = [threading.Thread(target=never_joined, args=(m,)) for m in (1, 0)]
  for t in waiting:
    t.start()
  reference = _run(_args(root / "reference", data_cache, compile_cache), root / "reference_out")
  for t in waiting:
    t.join()
  assert reference["rc"] == {0: 0, 1: 0}, _tails(reference)

  workdir = root / "run"
  args = _args(workdir, data_cache, compile_cache)
  resume_point = lambda epoch: [workdir / f"fold_{k}" / "latest" / str(epoch) for k in (0, 1)]
  # (launch, its fault: (process, "0-based epoch,batch", signal), the resume
  # points to wait for before it, the exit statuses it should end with); each
  # launch only where the one before ended as it should.
  chain = [
      ("preempted", (1, "0,2", "SIGTERM"), (), {0: 143, 1: 143}),
      ("coordinator_killed", (0, "1,1", "SIGKILL"), resume_point(1), {0: -9, 1: 75}),
      ("killed", (1, "2,1", "SIGKILL"), resume_point(2), {0: 75, 1: -9}),
      ("resumed", None, (), {0: 0, 1: 0}),
  ]
  runs, at_preemption, at_kill = {}, None, None
  for name, fault, after, stops_with in chain:
    runs[name] = _run(args, root / f"{name}_out", fault=fault, fault_after=after)
    if name == "preempted":
      at_preemption = {
          "latest": {
              k: sorted(p.name for p in (workdir / f"fold_{k}" / "latest").glob("[0-9]*"))
              for k in (0, 1)
          },
          "done": [(workdir / f"fold_{k}" / "done.json").exists() for k in (0, 1)],
      }
    if name == "killed":
      at_kill = {"resume_point": _disk_resume_point(workdir), "leftovers": _leftovers(workdir)}
    if runs[name]["rc"] != stops_with:
      break
  return {
      "root": root,
      "reference": root / "reference",
      "never": never,
      "workdir": workdir,
      "at_preemption": at_preemption,
      "at_kill": at_kill,
      **{name: runs.get(name) for name, *_ in chain},
  }


def test_sigterm_to_one_host_stops_every_host_at_the_same_resume_point(jobs):
  stopped = jobs["preempted"]
  assert stopped["fault_at"] is not None, "SIGTERM was never sent" + _tails(stopped)
  assert stopped["rc"] == {0: 143, 1: 143}, _tails(stopped)
  for log in stopped["logs"].values():
    assert "error: stopped by SIGTERM after epoch 1" in log
    _assert_clean_stop(log)
  # Both hosts saved one resume point together, at the epoch SIGTERM ended.
  assert jobs["at_preemption"] == {"latest": {0: ["1"], 1: ["1"]}, "done": [False, False]}
  took = max(stopped["ended"].values()) - stopped["fault_at"]
  assert took < SIGTERM_STOP_WITHIN_S, f"the hosts stopped {took:.0f}s after the SIGTERM" + _tails(
      stopped
  )


def _the_survivors_line(run, lost: int) -> str:
  """The one line of the process left when process `lost` was killed, checked.

  Resumed from epoch 1, it exits 75 within the heartbeat timeout + 30 s of
  the kill with no traceback or C++ frames, its line naming the lost process
  and the command that resumes the job.
  """
  assert run is not None, f"the job before the one that loses process {lost} did not stop"
  survivor = 1 - lost
  log = run["logs"][survivor]
  for k in (0, 1):
    assert f"Fold {k}: resumed from epoch 1." in log
  assert run["fault_at"] is not None, "the kill never came" + _tails(run)
  assert run["rc"] == {lost: -9, survivor: 75}, _tails(run)
  took = run["ended"][survivor] - run["fault_at"]
  print(f"process {survivor} stopped {took:.1f} s after process {lost} was killed")
  assert took < STOP_WITHIN_S, f"stopped {took:.0f} s after the kill" + _tails(run)
  _assert_clean_stop(log)
  [line] = _error_lines(log)
  assert line.startswith(f"error: lost process {lost} (host "), line
  assert "of this 2-process job" in line
  assert "start every process again with the same command to resume: python main.py" in line
  assert line.endswith("(exit status 75: a temporary failure, retry)")
  return line


def test_a_lost_coordinator_stops_the_others_in_one_line_with_exit_75(jobs):
  line = _the_survivors_line(jobs["coordinator_killed"], lost=0)
  assert ", the coordinator at 127.0.0.1:" in line
  assert f"in {jobs['workdir']}: fold 0 epoch 1, fold 1 epoch 1;" in line, line


def test_a_lost_host_stops_the_others_in_one_line_with_exit_75(jobs):
  workdir = jobs["workdir"]
  line = _the_survivors_line(jobs["killed"], lost=1)
  # Past the resume point it started from: the one on disk, named.
  point = jobs["at_kill"]["resume_point"]
  assert point == {0: 2, 1: 2}, point
  assert f"in {workdir}: fold 0 epoch {point[0]}, fold 1 epoch {point[1]};" in line, line
  assert "--config=configs/tpu.py" in line and f"--workdir={workdir}" in line
  assert not [f for f in jobs["at_kill"]["leftovers"] if ".tmp-" in f], jobs["at_kill"]


def test_the_same_commands_resume_to_the_uninterrupted_scores(jobs):
  from tests.conftest import _without_seconds

  resumed, workdir, reference = jobs["resumed"], jobs["workdir"], jobs["reference"]
  assert resumed is not None, "the job did not stop as it should when process 1 was lost"
  assert resumed["rc"] == {0: 0, 1: 0}, _tails(resumed)
  point = jobs["at_kill"]["resume_point"]
  for log in resumed["logs"].values():
    for k in (0, 1):
      assert f"Fold {k}: resumed from epoch {point[k]}." in log
  for name in ("scores.json", "submission.csv", "oof.csv"):
    assert (workdir / name).read_bytes() == (reference / name).read_bytes(), name
  for k in (0, 1):
    done = json.loads((workdir / f"fold_{k}" / "done.json").read_text())
    expected = json.loads((reference / f"fold_{k}" / "done.json").read_text())
    assert _without_seconds(done) == _without_seconds(expected)
  assert json.loads((workdir / "scores.json").read_text())["oof_score"] >= 0
  # What the kills left unfinished is gone.
  assert _leftovers(workdir) == []


def test_the_interrupted_job_finishes_once_with_process_0_writing_every_file(jobs, prepared_data):
  from saltjax.inference import submission
  from tests.conftest import _checkpoints

  resumed, workdir = jobs["resumed"], jobs["workdir"]
  assert resumed is not None and resumed["rc"] == {0: 0, 1: 0}, "the job did not finish"
  # Trained once to the end: every epoch recorded once, the final resume point.
  for k in (0, 1):
    done = json.loads((workdir / f"fold_{k}" / "done.json").read_text())
    assert [h["epoch"] for h in done["history"]] == list(range(1, POD_EPOCHS + 1))
    saved = _checkpoints(workdir / f"fold_{k}")
    assert (
        f"latest/{POD_EPOCHS}" in saved and saved[f"latest/{POD_EPOCHS}"][1]["epoch"] == POD_EPOCHS
    )
    assert (workdir / f"fold_{k}" / "latest" / str(POD_EPOCHS) / "checksums.json").exists()
  sub = pd.read_csv(workdir / "submission.csv", dtype=str, keep_default_na=False)
  submission.check_submission(sub, prepared_data.test_ids)
  assert not (workdir / ".lock").exists()  # released by process 0
  # Process 0 wrote every file of the workdir in all four launches; process 1
  # none (but its write probe). Files outside it are left out: each process may
  # record the compilation cache's readable entries in the cache directory.
  launches = ("preempted", "coordinator_killed", "killed", "resumed")
  writes = [w for name in launches for w in jobs[name]["writes"]]
  by_process = {
      i: {
          pathlib.Path(p).relative_to(workdir).as_posix()
          for j, p in writes
          if j == i and pathlib.Path(p).is_relative_to(workdir)
      }
      for i in range(NUM_PROCESSES)
  }
  assert all(name.startswith(".write-test") for name in by_process[1]), by_process[1]
  for name in (
      "config.json",
      "versions.json",
      "folds.csv",
      "submission.csv",
      "oof.csv",
      "scores.json",
      "fold_0/done.json",
      "fold_1/done.json",
  ):
    assert name in by_process[0], name
    assert (workdir / name).exists(), name


@pytest.mark.parametrize("missing", [1, 0])
def test_a_process_that_never_joins_ends_the_others_with_exit_75(jobs, missing):
  run = jobs["never"][missing]
  [present] = [i for i in range(NUM_PROCESSES) if i != missing]
  assert run["rc"] == {present: 75}, _tails(run)
  took = run["ended"][present] - run["joining"][present]
  print(f"process {present} stopped {took:.1f} s after it started to join")
  assert INITIALIZATION_S <= took < INITIALIZATION_S + 30, f"{took:.0f} s" + _tails(run)
  log = run["logs"][present]
  _assert_clean_stop(log)
  [line] = _error_lines(log)
  key = "config.distributed_initialization_timeout_seconds"
  if missing == 1:
    assert line.startswith(
        f"error: process 1 did not join this 2-process job within {INITIALIZATION_S} s ({key};"
        " the coordinator at 127.0.0.1:"
    ), line
  else:
    assert line.startswith("error: process 0, the coordinator at 127.0.0.1:"), line
    assert "did not start or cannot be reached from this host (process 1 of 2) within" in line
  assert "nothing saved yet" in line
  assert line.endswith("(exit status 75: a temporary failure, retry)")


# ------------------------------------------------- the message's parts, in-process ---


def test_the_resume_point_is_read_from_directory_names(tmp_path):
  from saltjax.app import host_loss

  (tmp_path / "fold_0" / "latest" / "2").mkdir(parents=True)
  (tmp_path / "fold_0" / "latest" / "3.orbax-checkpoint-tmp").mkdir()  # unfinished
  (tmp_path / "fold_1").mkdir()
  (tmp_path / "fold_1" / "done.json").write_text("{}")
  (tmp_path / "fold_10" / "latest").mkdir(parents=True)
  (tmp_path / "pseudo_round" / "fold_0" / "latest" / "1").mkdir(parents=True)
  assert host_loss.describe_resume_point(tmp_path) == (
      f"the last complete resume point in {tmp_path}: fold 0 epoch 2, fold 1 finished,"
      " fold 10 not started, pseudo-label fold 0 epoch 1"
  )
  assert host_loss.describe_resume_point(tmp_path / "new") == (
      f"nothing saved yet in {tmp_path / 'new'}"
  )


def test_a_stopped_process_removes_its_own_temporary_files_only(tmp_path):
  from saltjax import workdir as workdir_lib

  ours = [tmp_path / ".scores.json.tmp-123", tmp_path / "fold_0" / "latest" / "2" / ".c.tmp-123"]
  theirs = tmp_path / ".scores.json.tmp-1234"
  for path in (*ours, theirs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("half")
  assert sorted(workdir_lib.remove_temp_files(tmp_path, 123)) == sorted(ours)
  assert [p for p in tmp_path.rglob("*") if p.is_file()] == [theirs]


@pytest.mark.parametrize("value", [0, -5, True])
def test_a_bad_timeout_is_a_config_error_before_joining(value, tmp_path, capsys):
  from configs import tpu
  from saltjax.app import run as run_lib

  config = tpu.get_config()
  config.distributed_initialization_timeout_seconds = value
  assert run_lib.main(config, str(tmp_path / "run")) == 1
  err = capsys.readouterr().err
  assert f"config.distributed_initialization_timeout_seconds={value!r}: must be a whole" in err


def test_which_errors_wait_for_the_coordination_service():
  from saltjax.app import host_loss

  def raised(error, during=None):
    try:
      try:
        raise during or ValueError("first")
      except Exception:
        raise error
    except Exception as e:  # noqa: BLE001
      return e

  gloo = ValueError("UNKNOWN: Gloo AllGather failed: Connection closed by peer")
  assert host_loss._caused_by_runtime_error(gloo)
  assert host_loss._caused_by_runtime_error(raised(RuntimeError("orbax: barrier"), during=gloo))
  assert not host_loss._caused_by_runtime_error(raised(ValueError("bad shape")))

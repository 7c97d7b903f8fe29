"""Reliability: exact resume after a crash, reproducible runs, no silent failure.

- A training run killed with SIGKILL part-way and started again with the same
  command ends with bit-identical checkpoints and scores to a run never
  interrupted (CPU, same seed), and so does one that crashed between two
  checkpoint saves of one epoch.
- A non-finite loss stops training with a message naming the step and fold,
  keeping the last good checkpoint (and the folds trained with it stop too, named);
  config.nonfinite='skip' skips such steps without touching the model, while the
  learning-rate schedule goes on.
- A kill while a `latest` is still being written leaves a resume point whose
  best and swa models are on disk.
- Bad data directories and bad config values end main.py with exit status 1,
  a message naming the file, id or option, no traceback, and nothing in the
  workdir; corrupt checkpoints and checkpoints of another config are refused.

Cost: one training configuration (the tiny one of conftest, fold 0) is
compiled once, by the uninterrupted main.py run, into the session's persistent
compile cache; every other run here loads it from there. The cheap main.py
runs that fail on bad input start alongside that first run.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil
import signal
import threading
import time

import cv2
import numpy as np
import pandas as pd
import pytest

from saltjax.app import job as job_lib

from tests.conftest import (
    EPOCHS,
    FOLD,
    _checkpoints,
    _main_args,
    _popen_main,
    _steps,
    _without_seconds,
    run_main,
    tiny_config,
    with_sitecustomize,
)

_PAUSE_MID_EPOCH = """
import os, pathlib, runpy, sys, time
from saltjax.input_pipeline import tfdata
original = tfdata.epoch_iterator

def epoch_iterator(for_epoch, epoch, skip_batches=0):
  for i, batch in enumerate(original(for_epoch, epoch, skip_batches)):
    if (epoch, i) == (1, 2):
      pathlib.Path(os.environ["PAUSED_MARKER"]).write_text("paused")
      time.sleep(600)
    yield batch

tfdata.epoch_iterator = epoch_iterator
sys.argv[0] = "main.py"
runpy.run_path("main.py", run_name="__main__")
"""


# main.py sent SIGTERM (what a preempted VM gets) while epoch 2's third batch
# is handed to the train step; training goes on to the end of that epoch.
_SIGTERM_MID_EPOCH = """
import os, runpy, signal, sys
from saltjax.input_pipeline import tfdata
original = tfdata.epoch_iterator

def epoch_iterator(for_epoch, epoch, skip_batches=0):
  for i, batch in enumerate(original(for_epoch, epoch, skip_batches)):
    if (epoch, i) == (1, 2):
      os.kill(os.getpid(), signal.SIGTERM)
    yield batch

tfdata.epoch_iterator = epoch_iterator
sys.argv[0] = "main.py"
runpy.run_path("main.py", run_name="__main__")
"""


def _assert_same_training(fold_a: pathlib.Path, fold_b: pathlib.Path) -> None:
  """Bit-identical checkpoints (params, batch_stats, opt_state, step, lr scale) and scores."""
  a, b = _checkpoints(fold_a), _checkpoints(fold_b)
  assert sorted(a) == sorted(b)
  assert "latest/%d" % EPOCHS in a
  for name in a:
    leaves_a, meta_a = a[name]
    leaves_b, meta_b = b[name]
    assert sorted(leaves_a) == sorted(leaves_b), name
    differ = [k for k in leaves_a if leaves_a[k] != leaves_b[k]]
    assert not differ, f"{name}: {len(differ)} arrays differ, e.g. {differ[:3]}"
    assert meta_a == meta_b, name
  latest = a["latest/%d" % EPOCHS][0]
  for part in ("params", "batch_stats", "opt_state", "step", "lr_scale"):
    assert any(k.startswith(f"['{part}']") for k in latest), part
  done_a = json.loads((fold_a / "done.json").read_text())
  done_b = json.loads((fold_b / "done.json").read_text())
  assert _without_seconds(done_a) == _without_seconds(done_b)
  assert len(done_a["history"]) == EPOCHS


def _assert_same_result(fold_a: pathlib.Path, fold_b: pathlib.Path) -> None:
  """The same final state and models, however often each run wrote its checkpoints."""
  a, b = _checkpoints(fold_a), _checkpoints(fold_b)
  final = ["latest/%d" % EPOCHS, "best/%d" % max(_steps(fold_a / "best"))]
  final += [k for k in a if k.startswith("snapshots/")]
  assert final[1] in b and sorted(k for k in b if k.startswith("snapshots/")) == sorted(
      k for k in a if k.startswith("snapshots/")
  )
  for name in final:
    assert a[name][0] == b[name][0], name
    assert a[name][1] == b[name][1], name
  done_a = json.loads((fold_a / "done.json").read_text())
  done_b = json.loads((fold_b / "done.json").read_text())
  assert _without_seconds(done_a) == _without_seconds(done_b)


def _empty(workdir: pathlib.Path) -> bool:
  return not workdir.exists() or not any(workdir.iterdir())


# ---------------------------------------------------------- bad input table ---
# (id, what to break, expected words in the message). Data cases break one id
# of a small synthetic Kaggle-layout directory; config cases override options.


def _break_one(kind: str, data_dir: pathlib.Path, id_: str, test_id: str) -> None:
  if kind == "missing_mask":
    (data_dir / f"train/masks/{id_}.png").unlink()
  elif kind == "rgba_image":
    path = data_dir / f"train/images/{id_}.png"
    gray = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), np.dstack([gray, gray, gray, np.full_like(gray, 255)]))
  elif kind == "malformed_rle":
    frame = pd.read_csv(data_dir / "train.csv", dtype=str, keep_default_na=False)
    frame.loc[frame["id"] == id_, "rle_mask"] = "5 x 7"
    frame.to_csv(data_dir / "train.csv", index=False)
  elif kind == "id_missing_from_depths":
    frame = pd.read_csv(data_dir / "depths.csv", dtype=str)
    frame[frame["id"] != id_].to_csv(data_dir / "depths.csv", index=False)
  elif kind == "missing_test_image":
    (data_dir / f"test/images/{test_id}.png").unlink()
  else:
    raise AssertionError(kind)


BAD_DATA = [
    ("missing_mask", ["train/masks/{id}.png", "{id}"]),
    ("rgba_image", ["train/images/{id}.png", "4 channels"]),
    ("malformed_rle", ["train.csv", "'{id}'", "invalid"]),
    ("id_missing_from_depths", ["'{id}'", "depths.csv"]),
    ("missing_test_image", ["test/images/{test_id}.png"]),
]
BAD_CONFIG = [
    ("negative_batch_size", {"batch_size": -8}, ["config.batch_size=-8", "positive"]),
    (
        "unknown_loss",
        {"loss.name": "focal_nope"},
        ["config.loss.name='focal_nope'", "unknown loss"],
    ),
    ("fold_out_of_range", {"fold": 2}, ["config.fold=2", "0..1"]),
    ("unknown_optimizer", {"optimizer.name": "lamb"}, ["config.optimizer.name='lamb'"]),
    ("bad_tta", {"predict.tta": "rot90"}, ["config.predict.tta='rot90'"]),
    (
        "image_size_not_multiple_of_32",
        {"image_size": 100},
        ["config.image_size=100", "multiple of 32"],
    ),
    ("unknown_nonfinite", {"nonfinite": "ignore"}, ["config.nonfinite='ignore'"]),
    (
        "augment_argument_out_of_range",
        {"augment": "hflip|shift(200)"},
        ["config.augment='hflip|shift(200)'", "pixels=200 must be in [0, 100]"],
    ),
    # Valid on its own, too big for the data: checked before anything is written.
    (
        "batch_bigger_than_a_fold",
        {"batch_size": 64, "eval_batch_size": 64},
        ["config.batch_size=64", "24 training images"],
    ),
]
CASES = [pytest.param("data", kind, {}, words, id=kind) for kind, words in BAD_DATA] + [
    pytest.param("config", name, overrides, words, id=name) for name, overrides, words in BAD_CONFIG
]
# The ones also run through main.py itself (each costs a process's imports).
VIA_MAIN_PY = (
    "missing_mask",
    "fold_out_of_range",
    "batch_bigger_than_a_fold",
    "augment_argument_out_of_range",
)


@pytest.fixture(scope="module")
def base_layout(tmp_path_factory):
  from saltjax.data import synthetic_dataset

  root = synthetic_dataset.write_dataset(
      tmp_path_factory.mktemp("layout") / "base", num_train=12, num_test=4, seed=0
  )
  train_ids = list(pd.read_csv(root / "train.csv", dtype=str)["id"])
  test_ids = sorted(p.stem for p in (root / "test/images").iterdir())
  return root, train_ids[3], test_ids[1]


def _case(
    tmp_path: pathlib.Path, base_layout, source: str, name: str, overrides: dict, words: list[str]
):
  """(config overrides, expected words) for one case, its data dir made."""
  root, id_, test_id = base_layout
  overrides = dict(overrides)
  if source == "data":
    data_dir = tmp_path / f"data_{name}"
    shutil.copytree(root, data_dir)
    _break_one(name, data_dir, id_, test_id)
    overrides["data_dir"] = str(data_dir)
  return overrides, [w.format(id=id_, test_id=test_id) for w in words]


@pytest.fixture(scope="module")
def bad_runs_via_main(reference_started, tmp_path_factory, base_layout, data_cache, compile_cache):
  """main.py started on every VIA_MAIN_PY case at once (and after the reference run)."""
  root = tmp_path_factory.mktemp("via_main")
  started = {}
  for param in CASES:
    source, name, overrides, words = param.values
    if name in VIA_MAIN_PY:
      overrides, words = _case(root, base_layout, source, name, overrides, words)
      workdir, log = root / f"workdir_{name}", root / f"{name}.stderr"
      proc = _popen_main(_main_args(workdir, data_cache, compile_cache, **overrides), log)
      started[name] = (proc, log, workdir, words)
  yield started
  for proc, *_ in started.values():
    if proc.poll() is None:
      proc.kill()
      proc.wait()


# First in the file: its processes start the reference run's compilation, which
# the tests after it (those that need no training) overlap with.
@pytest.mark.parametrize("name", VIA_MAIN_PY)
def test_bad_input_through_main_py(name, bad_runs_via_main):
  proc, log, workdir, words = bad_runs_via_main[name]
  rc = proc.wait(timeout=300)
  err = log.read_text()
  assert rc == 1, err[-3000:]
  for word in words:
    assert word in err, (word, err[-3000:])
  assert "Traceback" not in err
  assert _empty(workdir)


def test_config_checks_report_every_bad_option_at_once(data_cache, compile_cache):
  from saltjax.app import config_checks

  config = tiny_config(data_cache, compile_cache)
  for _, overrides, _ in BAD_CONFIG[:-1]:
    for key, value in overrides.items():
      node = config
      *path, last = key.split(".")
      for part in path:
        node = node[part]
      node[last] = value
  with pytest.raises(config_checks.ConfigError) as raised:
    config_checks.check(config)
  for _, _, words in BAD_CONFIG[:-1]:
    assert words[0] in str(raised.value)


def test_a_config_error_is_reported_before_tensorflow_is_imported(tmp_path):
  """TensorFlow (about 6 s of imports) is loaded where data is first read, not
  before the config is checked: main.py names the bad option without it."""
  imported = tmp_path / "imported.txt"
  env = with_sitecustomize(
      tmp_path / "site",
      "import atexit, sys\n"
      f"atexit.register(lambda: open({str(imported)!r}, 'w').write("
      "' '.join(m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules)))\n",
  )
  result = run_main(
      [
          "--config=configs/quick.py",
          f"--workdir={tmp_path / 'workdir'}",
          "--config.augment=hflip|shift(200)",
      ],
      env=env,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert "config.augment='hflip|shift(200)'" in result.stderr
  assert "Traceback" not in result.stderr
  assert _empty(tmp_path / "workdir")
  assert imported.read_text() == ""


@pytest.mark.parametrize("source, name, overrides, words", CASES)
def test_bad_input_is_refused_before_anything_is_written(
    source,
    name,
    overrides,
    words,
    tmp_path,
    base_layout,
    prepared_data,
    data_cache,
    compile_cache,
    capfd,
    monkeypatch,
):
  from saltjax.app import run

  monkeypatch.delenv("SALTJAX_DEBUG", raising=False)
  overrides, words = _case(tmp_path, base_layout, source, name, overrides, words)
  config = tiny_config(data_cache, compile_cache, **{"fold": FOLD, **overrides})
  workdir = tmp_path / "workdir"
  assert run.main(config, str(workdir)) == 1
  err = capfd.readouterr().err
  assert "error: " in err
  for word in words:
    assert word in err, (word, err)
  assert "Traceback" not in err
  assert _empty(workdir)


# ----------------------------------------------------------------- outputs ---


def test_invalid_submission_is_never_written(tmp_path):
  from saltjax.data import dataset as data_lib
  from saltjax.inference import submission

  path = tmp_path / "submission.csv"
  masks = np.zeros((3, 101, 101), np.uint8)
  with pytest.raises(submission.SubmissionError, match="duplicated ids"):
    submission.write_submission(path, ["a", "b", "a"], masks)
  with pytest.raises(submission.SubmissionError, match="3 masks for 2 test ids"):
    submission.write_submission(path, ["a", "b"], masks)
  assert not path.exists()
  submission.write_submission(path, ["a", "b", "c"], masks)
  data_lib.write_text_atomic("{}", tmp_path / "scores.json")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json", "submission.csv"]


# ----------------------------------------------------------------- records ---


# The first test to need the reference run: `killed_and_resumed` starts here,
# in the background, for test_sigkilled_run_resumes_to_bit_identical_results.
def test_every_run_records_config_versions_and_folds(reference, killed_and_resumed, prepared_data):
  config = json.loads((reference / "config.json").read_text())
  assert config["fold"] == FOLD and config["num_epochs"] == EPOCHS
  assert config["model"]["encoder_width"] == 4
  versions = json.loads((reference / "versions.json").read_text())
  for package in ("python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    assert package in versions
  folds = pd.read_csv(reference / "folds.csv", dtype={"id": str})
  assert list(folds["id"]) == list(prepared_data.train_ids)
  assert sorted(set(folds["fold"])) == [0, 1]
  # Everything is written under a temporary name, then renamed.
  assert not [p for p in reference.rglob("*tmp*")]


def test_a_finished_fold_is_not_trained_again(
    reference, tmp_path, monkeypatch, data_cache, compile_cache
):
  from saltjax.training.job import Job

  def no_job(*args, **kwargs):
    raise AssertionError("a finished fold was set up for training again")

  shutil.copytree(reference, tmp_path / "run")
  monkeypatch.setattr(Job, "create", no_job)
  config = tiny_config(data_cache, compile_cache, fold=FOLD)
  summary = job_lib.train_and_evaluate(config, str(tmp_path / "run"))
  done = json.loads((tmp_path / "run" / f"fold_{FOLD}" / "done.json").read_text())
  assert summary["folds"] == [done]


# ------------------------------------------------------------------ resume ---


def _kill_mid_epoch_then_resume(
    args: list[str],
    workdir: pathlib.Path,
    logs: pathlib.Path,
    out: dict,
    wait_for_epoch_1: bool = False,
) -> None:
  """main.py SIGKILLed mid-epoch 2, then the same command run again; facts into `out`.

  `wait_for_epoch_1`: kill only once epoch 1's resume point, written in the
  background while epoch 2 trains, is on disk.
  """
  marker = logs / "paused"
  proc = _popen_main(
      args, logs / "killed.stderr", env={"PAUSED_MARKER": str(marker)}, hook=_PAUSE_MID_EPOCH
  )
  out["killed"] = proc
  deadline = time.time() + 600
  try:
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    latest = workdir / f"fold_{FOLD}" / "latest"
    until = time.time() + 120
    while wait_for_epoch_1 and not _steps(latest) and time.time() < until:
      time.sleep(0.05)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  out["killed_stderr"] = (logs / "killed.stderr").read_text()
  out["latest_at_kill"] = _steps(workdir / f"fold_{FOLD}" / "latest")
  out["done_at_kill"] = (workdir / f"fold_{FOLD}" / "done.json").exists()
  if proc.returncode == -signal.SIGKILL:
    out["resumed"] = run_main(args)


# checkpoint_every_seconds: 0 writes the resume point every epoch; the
# default (300) writes it only at the end of these short runs.
CADENCES = (0, 300)


@pytest.fixture(scope="module")
def killed_and_resumed(reference, tmp_path_factory, data_cache, compile_cache):
  """Runs in the background from when the reference is done (on the compile cache it
  filled), while the in-process tests go on; one run per checkpoint cadence."""
  runs = {}
  for cadence in CADENCES:
    logs = tmp_path_factory.mktemp(f"killed_{cadence}")
    workdir = logs / "run"
    out = {}
    args = _main_args(workdir, data_cache, compile_cache, checkpoint_every_seconds=cadence)
    thread = threading.Thread(
        target=_kill_mid_epoch_then_resume,
        daemon=True,
        args=(args, workdir, logs, out, cadence == 0),
    )
    thread.start()
    runs[cadence] = (thread, workdir, out)
  yield runs
  for thread, _, out in runs.values():
    thread.join(timeout=900)
    if "killed" in out and out["killed"].poll() is None:
      out["killed"].kill()
      out["killed"].wait()


class _Crash(Exception):
  pass


def test_crash_between_checkpoint_saves_of_an_epoch_resumes(
    reference, shared_job, tmp_path, monkeypatch, data_cache, compile_cache
):
  """Killed after epoch 2's snapshot/best saves, before its `latest`: epoch 2 is redone."""
  from saltjax import checkpoints as ckpt_lib
  from saltjax.app import process

  config = tiny_config(data_cache, compile_cache, fold=FOLD)
  process.enable_compilation_cache(config)
  save_latest = ckpt_lib.FoldCheckpoints.save_latest

  def crashing(self, epoch, state, meta):
    if epoch == 2:
      raise _Crash()
    save_latest(self, epoch, state, meta)

  monkeypatch.setattr(ckpt_lib.FoldCheckpoints, "save_latest", crashing)
  with pytest.raises(_Crash):
    job_lib.train_and_evaluate(config, str(tmp_path))
  fold_dir = tmp_path / f"fold_{FOLD}"
  assert _steps(fold_dir / "latest") == [1]
  assert _steps(fold_dir / "snapshots") == [2]  # the cosine cycle's end: saved before latest

  monkeypatch.setattr(ckpt_lib.FoldCheckpoints, "save_latest", save_latest)
  job_lib.train_and_evaluate(config, str(tmp_path))
  # Same as the uninterrupted main.py run (which is also in-process == subprocess).
  _assert_same_training(reference / f"fold_{FOLD}", fold_dir)


def test_a_kill_while_latest_is_still_written_leaves_a_fold_that_resumes(
    shared_job, tmp_path, monkeypatch, data_cache, compile_cache
):
  """Epoch 2's `latest` is slow: still being written when epoch 3's best and swa are
  written (every epoch, SWA from epoch 1) and the run is killed. Until that write is
  complete, the resume point on disk is epoch 1's, so its best and its average must
  still be there: the same command resumes from epoch 1 and ends as the run that was
  not killed. Once a newer `latest` is complete, what it no longer refers to goes."""
  import json

  from saltjax import checkpoints as ckpt_lib
  from saltjax.app import process

  config = tiny_config(data_cache, compile_cache, fold=FOLD, swa_from_epoch=1)
  process.enable_compilation_cache(config)
  save_latest = ckpt_lib.FoldCheckpoints.save_latest
  workdir, killed = tmp_path / "run", tmp_path / "killed"

  def slow(self, epoch, state, meta):
    if epoch == 2:
      self.finish()  # epoch 1's `latest` is complete on disk...
      return  # ... epoch 2's is started and never gets there before the kill
    if epoch == 3:
      # The kill, while this save waits for epoch 2's: what the disk holds now.
      shutil.copytree(workdir, killed)
    save_latest(self, epoch, state, meta)

  monkeypatch.setattr(ckpt_lib.FoldCheckpoints, "save_latest", slow)
  job_lib.train_and_evaluate(config, str(workdir))  # this one goes on, as if not killed
  monkeypatch.setattr(ckpt_lib.FoldCheckpoints, "save_latest", save_latest)

  fold_dir = killed / f"fold_{FOLD}"
  assert _steps(fold_dir / "latest") == [1]
  meta = _checkpoints(fold_dir)["latest/1"][1]
  assert meta["best_epoch"] == 1 and meta["swa_count"] == 1
  assert 1 in _steps(fold_dir / "best") and 1 in _steps(fold_dir / "swa")
  # A resume point whose model is gone says which one, and that it is missing.
  shutil.copytree(killed, tmp_path / "damaged")
  shutil.rmtree(tmp_path / "damaged" / f"fold_{FOLD}" / "swa" / "1")
  with pytest.raises(ckpt_lib.CheckpointError, match="swa/1 is missing"):
    job_lib.train_and_evaluate(config, str(tmp_path / "damaged"))

  job_lib.train_and_evaluate(config, str(killed))
  _assert_same_result(workdir / f"fold_{FOLD}", fold_dir)
  final_swa = f"swa/{EPOCHS + 1}"
  assert _checkpoints(fold_dir)[final_swa] == _checkpoints(workdir / f"fold_{FOLD}")[final_swa]
  # Finished, each store keeps what the final resume point (epoch 3) refers to,
  # and the final average.
  for directory in (workdir, killed):
    done = json.loads((directory / f"fold_{FOLD}" / "done.json").read_text())
    assert _steps(directory / f"fold_{FOLD}" / "best") == [done["best_epoch"]]
    assert _steps(directory / f"fold_{FOLD}" / "swa") == [EPOCHS, EPOCHS + 1]


# -------------------------------------------------------- numerical faults ---


def _inject_nan(monkeypatch, epoch: int, batch: int) -> None:
  """Batch `batch` of epoch `epoch` (both 0-based) gets NaN images."""
  from saltjax.input_pipeline import tfdata

  original = tfdata.epoch_iterator

  def epoch_iterator(for_epoch, e, skip_batches=0):
    for i, b in enumerate(original(for_epoch, e, skip_batches)):
      yield {**b, "image": np.full_like(b["image"], np.nan)} if (e, i) == (epoch, batch) else b

  monkeypatch.setattr(tfdata, "epoch_iterator", epoch_iterator)


def _steps_per_epoch(config, data) -> int:
  from saltjax.data import dataset as data_lib
  from saltjax import parallel
  from saltjax.training.job import steps_per_epoch_for

  fold_of = data_lib.fold_assignment(config, data)["fold"].to_numpy()
  return steps_per_epoch_for(config, parallel.create_mesh(), fold_of)


def test_nonfinite_loss_stops_naming_step_and_fold_and_keeps_last_good_checkpoint(
    reference, shared_job, tmp_path, monkeypatch, prepared_data, data_cache, compile_cache, capfd
):
  from saltjax.app import process
  from saltjax.app import run
  from saltjax.errors import NonFiniteError

  config = tiny_config(data_cache, compile_cache, fold=FOLD)
  process.enable_compilation_cache(config)
  _inject_nan(monkeypatch, epoch=1, batch=1)
  step = _steps_per_epoch(config, prepared_data) + 2
  expected = f"non-finite loss or gradient at step {step} (fold {FOLD}, epoch 2)"

  with pytest.raises(NonFiniteError, match=re.escape(expected)):
    job_lib.train_and_evaluate(config, str(tmp_path))
  latest = tmp_path / f"fold_{FOLD}" / "latest"
  assert _steps(latest) == [1]

  # What main.py does: resumes from epoch 1, meets the same step, exits 1.
  monkeypatch.delenv("SALTJAX_DEBUG", raising=False)
  capfd.readouterr()
  assert run.main(config, str(tmp_path)) == 1
  err = capfd.readouterr().err
  assert f"error: {expected}" in err
  assert f"the last good checkpoint is epoch 1 in {latest}" in err
  assert "config.nonfinite='skip'" in err
  assert "Traceback" not in err
  assert _steps(latest) == [1]
  leaves, meta = _checkpoints(tmp_path / f"fold_{FOLD}")["latest/1"]
  assert meta["epoch"] == 1
  for dtype, shape, data in leaves.values():
    assert np.all(np.isfinite(np.frombuffer(data, dtype).astype(np.float64)))


def test_nonfinite_skip_leaves_the_model_unchanged_advances_the_schedule_and_goes_on(
    reference, shared_job, tmp_path, monkeypatch, prepared_data, data_cache, compile_cache, caplog
):
  """A skipped step changes no weights, statistics or optimiser moments, but counts:
  `step` and the schedule's count (which the learning rate is read from) go on by one,
  so the schedule stays on the step number the epochs give it."""
  import jax
  import optax
  from saltjax.app import process
  from saltjax.training.job import Job

  config = tiny_config(data_cache, compile_cache, fold=FOLD, nonfinite="skip")
  process.enable_compilation_cache(config)
  _inject_nan(monkeypatch, epoch=1, batch=1)
  step = _steps_per_epoch(config, prepared_data) + 2
  seen = []
  create = Job.create

  def recording(config, mesh, fold_of, writer, num_extra=0):
    job = create(config, mesh, fold_of, writer, num_extra=num_extra)

    def wrap(fn):
      def step_fn(state, batch):
        if not np.all(np.isfinite(np.asarray(batch["image"]))):
          before = jax.device_get(state)  # the step donates its input
          new_state, metrics = fn(state, batch)
          seen.append((before, jax.device_get(new_state), jax.device_get(metrics)))
          return new_state, metrics
        return fn(state, batch)

      return step_fn

    return dataclasses.replace(job, train_steps={n: wrap(f) for n, f in job.train_steps.items()})

  monkeypatch.setattr(Job, "create", recording)
  caplog.set_level("WARNING")
  summary = job_lib.train_and_evaluate(config, str(tmp_path))

  assert len(seen) == 1
  before, after, metrics = seen[0]
  assert not metrics["finite"] and not np.isfinite(metrics["loss"])
  for part in ("params", "batch_stats", "lr_scale"):
    a, b = jax.tree.leaves(getattr(before, part)), jax.tree.leaves(getattr(after, part))
    assert len(a) == len(b)
    assert all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(a, b)), part
  # The skipped step is step `step` of the run: the state then holds `step` steps.
  np.testing.assert_array_equal(np.asarray(before.step), step - 1)
  np.testing.assert_array_equal(np.asarray(after.step), step)
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  nodes_before = jax.tree.leaves(before.opt_state, is_leaf=is_schedule)
  nodes_after = jax.tree.leaves(after.opt_state, is_leaf=is_schedule)
  schedules = [(a, b) for a, b in zip(nodes_before, nodes_after) if is_schedule(a)]
  assert len(schedules) == 1 and len(nodes_before) == len(nodes_after)
  _, schedule_after = schedules[0]
  np.testing.assert_array_equal(np.asarray(schedule_after.count), step)
  moments = [(a, b) for a, b in zip(nodes_before, nodes_after) if not is_schedule(a)]
  assert moments  # Adam's moments and its own count: untouched
  assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in moments)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(after.params))
  assert f"skipped 1 non-finite step(s), first at step {step}" in caplog.text

  history = summary["folds"][0]["history"]
  assert len(history) == EPOCHS
  assert all(np.isfinite(h["train_loss"]) for h in history)
  assert (tmp_path / f"fold_{FOLD}" / "done.json").exists()
  leaves, _ = _checkpoints(tmp_path / f"fold_{FOLD}")[f"latest/{EPOCHS}"]
  assert all(
      np.all(np.isfinite(np.frombuffer(d, t).astype(np.float64))) for t, _, d in leaves.values()
  )


def test_nonfinite_in_one_fold_of_a_group_names_it_and_the_folds_stopped_with_it(tmp_path):
  """Folds trained together stop together: the message names the fold whose loss was
  not finite, and the others that stopped with it."""
  import types

  from saltjax.errors import NonFiniteError
  from saltjax.training import loop
  from saltjax.training.progress import FoldProgress

  config = tiny_config("", "", nonfinite="stop")
  job = types.SimpleNamespace(config=config, writer=None, steps_per_epoch=3, lr_fn=lambda s: 0.1)
  folds = [0, 2, 3]
  group = types.SimpleNamespace(
      folds=folds,
      progress=[FoldProgress(k) for k in folds],
      checkpoints=[
          types.SimpleNamespace(latest=types.SimpleNamespace(directory=tmp_path / f"f{k}"))
          for k in folds
      ],
      val_counts=[4, 4, 4],
      saved_epoch=1,
  )
  finite = [[True, True, True], [True, False, True], [True, True, True]]  # fold 2, 2nd step
  host_steps = [
      {
          "loss": np.where(f, 0.5, np.nan).astype(np.float32),
          "finite": np.array(f),
          "iou": np.full(3, 0.5, np.float32),
      }
      for f in finite
  ]
  with pytest.raises(NonFiniteError) as raised:
    loop._record_epoch(
        job, group, 1, host_steps, np.ones((3, 2), np.float32), np.ones(3, np.float32), time.time()
    )
  message = str(raised.value)
  # Epoch 2 (0-based 1) starts at step 3 * 1 + 1 = 4; its second step is step 5.
  assert "non-finite loss or gradient at step 5 (fold 2, epoch 2)" in message
  assert f"the last good checkpoint is epoch 1 in {tmp_path / 'f2'}" in message
  assert "Fold(s) 0, 3, trained together with fold 2, stopped with it" in message


def test_sigterm_saves_the_resume_point_then_resumes_to_the_same_result(
    reference, tmp_path, data_cache, compile_cache
):
  """A preempted VM gets SIGTERM: the epoch in progress ends, its resume point is
  written (although the default cadence would wait 300 s) and the program exits
  143; the same command then finishes the run as if it was never stopped."""
  workdir = tmp_path / "run"
  args = _main_args(workdir, data_cache, compile_cache, checkpoint_every_seconds=300)
  proc = _popen_main(args, tmp_path / "stopped.stderr", hook=_SIGTERM_MID_EPOCH)
  rc = proc.wait(timeout=600)
  err = (tmp_path / "stopped.stderr").read_text()
  assert rc == 143, err[-3000:]
  assert "error: stopped by SIGTERM after epoch 2" in err
  assert "Traceback" not in err
  assert _steps(workdir / f"fold_{FOLD}" / "latest") == [2]
  assert not (workdir / f"fold_{FOLD}" / "done.json").exists()
  result = run_main(args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Fold {FOLD}: resumed from epoch 2." in result.stderr
  _assert_same_result(reference / f"fold_{FOLD}", workdir / f"fold_{FOLD}")


# Last: the runs it checks have gone on in the background meanwhile.
@pytest.mark.parametrize("cadence", CADENCES)
def test_sigkilled_run_resumes_to_bit_identical_results(cadence, reference, killed_and_resumed):
  thread, workdir, out = killed_and_resumed[cadence]
  thread.join(timeout=900)
  assert not thread.is_alive()
  assert out["killed"].returncode == -signal.SIGKILL, out["killed_stderr"][-3000:]
  # Killed in epoch 2: after epoch 1's checkpoint when it is written every
  # epoch, before any at the default cadence.
  assert out["latest_at_kill"] == ([1] if cadence == 0 else [])
  assert not out["done_at_kill"]
  # The same command again, without the pause.
  result = out["resumed"]
  assert result.returncode == 0, result.stderr[-3000:]
  if cadence == 0:
    assert f"Fold {FOLD}: resumed from epoch 1." in result.stderr
    _assert_same_training(reference / f"fold_{FOLD}", workdir / f"fold_{FOLD}")
  else:
    _assert_same_result(reference / f"fold_{FOLD}", workdir / f"fold_{FOLD}")

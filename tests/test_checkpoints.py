"""Checkpoints: corrupt ones are refused whole, another config's are refused, a
structure mismatch says so, a redone epoch saves its step again.

The checkpoints come from the suite's reference run (conftest).
"""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
import pytest

from tests.conftest import EPOCHS, FOLD, _steps, tiny_config


def _copy_for_resume(reference: pathlib.Path, to: pathlib.Path) -> pathlib.Path:
  """The reference workdir, its fold made unfinished: a run resumes from `latest`."""
  shutil.copytree(reference, to)
  (to / f"fold_{FOLD}" / "done.json").unlink()
  return to / f"fold_{FOLD}" / "latest" / str(EPOCHS)


def _truncate(path: pathlib.Path) -> None:
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d")


CORRUPTIONS = {
    "truncated_array_file": lambda d: _truncate(_data_files(d)[0]),
    "deleted_manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "flipped_byte": lambda d: _flip(_data_files(d)[-1]),
    "deleted_meta": lambda d: shutil.rmtree(d / "meta"),
    # Without its checksums (a crash right after orbax finished the step),
    # what orbax reads first is still checked. (Arrays orbax fails to read
    # are refused too, but leave its asyncio tasks complaining on stderr.)
    "truncated_meta_without_checksums": lambda d: [
        (d / "checksums.json").unlink(),
        _truncate(d / "meta" / "metadata"),
    ],
}


def _flip(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_is_refused_not_half_loaded(
    corruption, reference, tmp_path, data_cache, compile_cache
):
  import jax
  from saltjax import checkpoints as ckpt_lib

  config = tiny_config(data_cache, compile_cache, fold=FOLD)
  target = jax.device_get(_raw_state(reference / f"fold_{FOLD}" / "latest", EPOCHS))
  step_dir = _copy_for_resume(reference, tmp_path / "run")
  CORRUPTIONS[corruption](step_dir)
  checkpoints = ckpt_lib.FoldCheckpoints(step_dir.parents[1], config)
  with pytest.raises(ckpt_lib.CheckpointError, match="corrupt") as raised:
    checkpoints.latest.restore(EPOCHS, target, checkpoints.fingerprint)
  assert str(step_dir) in str(raised.value)
  # One sentence naming the directory, not a dump of tensorstore's spec.
  assert len(str(raised.value)) < 600 and "\n" not in str(raised.value), str(raised.value)
  checkpoints.close()


def _raw_state(store_dir: pathlib.Path, step: int):
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager(
      store_dir.absolute(),
      item_names=("state", "meta"),
      options=ocp.CheckpointManagerOptions(read_only=True),
  )
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  manager.close()
  return state


def _listing(root: pathlib.Path) -> list[pathlib.Path]:
  """Every path under root but the tensorboard logs (each run adds an event file)."""
  return sorted(p.relative_to(root) for p in root.rglob("*") if "tensorboard" not in p.parts)


def test_main_refuses_a_corrupt_checkpoint(
    reference, shared_job, tmp_path, data_cache, compile_cache, capfd, monkeypatch
):
  from saltjax.app import run

  monkeypatch.delenv("SALTJAX_DEBUG", raising=False)
  step_dir = _copy_for_resume(reference, tmp_path / "run")
  damaged = _data_files(step_dir)[0]
  _truncate(damaged)
  before = _listing(tmp_path)
  config = tiny_config(data_cache, compile_cache, fold=FOLD)
  assert run.main(config, str(tmp_path / "run")) == 1
  err = capfd.readouterr().err
  assert f"error: checkpoint {step_dir} is corrupt or incomplete" in err
  assert damaged.relative_to(step_dir).as_posix() in err
  assert "Traceback" not in err
  # Refused as it is: not replaced, not trained over.
  assert _listing(tmp_path) == before


def test_changed_model_config_is_refused_for_the_same_workdir(
    reference, tmp_path, data_cache, compile_cache, capfd, monkeypatch
):
  from saltjax import checkpoints as ckpt_lib
  from saltjax.app import run

  monkeypatch.delenv("SALTJAX_DEBUG", raising=False)
  _copy_for_resume(reference, tmp_path / "run")
  saved = (tmp_path / "run" / "config.json").read_text()
  config = tiny_config(data_cache, compile_cache, fold=FOLD, **{"model.encoder_width": 8})
  assert run.main(config, str(tmp_path / "run")) == 1
  err = capfd.readouterr().err
  assert "config.model.encoder_width was 4, now 8" in err
  assert str(tmp_path / "run" / "config.json") in err
  assert "Traceback" not in err
  assert (tmp_path / "run" / "config.json").read_text() == saved

  # The checkpoints themselves refuse another model or input config too.
  for overrides in ({"model.encoder_width": 8}, {"image_size": 96}):
    other = tiny_config(data_cache, compile_cache, fold=FOLD, **overrides)
    checkpoints = ckpt_lib.FoldCheckpoints(reference / f"fold_{FOLD}", other)
    with pytest.raises(ckpt_lib.CheckpointError, match="another model/input config"):
      checkpoints.latest.restore(EPOCHS, None, checkpoints.fingerprint)
    checkpoints.close()


def test_a_checkpoint_step_is_saved_again(tmp_path, data_cache, compile_cache):
  """A redone epoch saves its step again (orbax alone refuses); nothing is pruned
  while no resume point is complete."""
  from saltjax import checkpoints as ckpt_lib

  config = tiny_config(data_cache, compile_cache, fold=FOLD)
  checkpoints = ckpt_lib.FoldCheckpoints(tmp_path, config)
  tree = lambda value: {"params": {"w": np.full((3,), value, np.float32)}}
  for epoch in (1, 2, 3):
    checkpoints.save_model("swa", epoch, tree(epoch), {"epoch": epoch})
    checkpoints.save_model("best", epoch, tree(epoch), {"epoch": epoch})
  assert _steps(tmp_path / "swa") == [1, 2, 3]
  assert _steps(tmp_path / "best") == [1, 2, 3]
  restored, meta = checkpoints.swa.restore(2, tree(0), checkpoints.fingerprint)
  assert meta["epoch"] == 2 and restored["params"]["w"].tolist() == [2, 2, 2]
  # ... and epoch 3 redone saves its step again, with what it computed this time.
  checkpoints.save_model("swa", 3, tree(30), {"epoch": 3})
  checkpoints.save_model("best", 3, tree(30), {"epoch": 3})
  restored, _ = checkpoints.best.restore(3, tree(0), checkpoints.fingerprint)
  assert restored["params"]["w"].tolist() == [30, 30, 30]
  assert _steps(tmp_path / "swa") == [1, 2, 3]
  # Nothing recorded (no done.json, no resume point): the highest step.
  assert ckpt_lib.model_checkpoints(tmp_path, "swa") == [("swa", 3)]
  # What a save killed part-way leaves behind is not taken for a checkpoint.
  (tmp_path / "best" / "4.orbax-checkpoint-tmp").mkdir()
  assert ckpt_lib.model_checkpoints(tmp_path, "best") == [("best", 3)]
  checkpoints.close()


def _tree(value):
  return {"params": {"w": np.full((3,), value, np.float32)}}


def _epoch_save(checkpoints, epoch: int, best_epoch: int, latest: bool = True) -> None:
  """What train._save writes for one epoch: the models, finished, then `latest`."""
  if best_epoch == epoch:
    checkpoints.save_model("best", epoch, _tree(epoch), {"epoch": epoch})
  checkpoints.save_model("swa", epoch, _tree(epoch), {"epoch": epoch})
  checkpoints.best.finish()
  checkpoints.swa.finish()
  if latest:
    meta = {"epoch": epoch, "best_epoch": best_epoch, "swa_count": epoch}
    checkpoints.save_latest(epoch, _tree(epoch), meta)


def test_best_and_swa_are_pruned_only_by_a_complete_newer_resume_point(
    tmp_path, data_cache, compile_cache, monkeypatch
):
  """Epoch 3's `latest` is slow (asynchronous, still being written) when epoch 4's
  models are written and the run is killed: the complete resume point, epoch 2's,
  still finds its best (epoch 1) and its average (epoch 2). A step is deleted once a
  complete `latest` reaches past it without referring to it."""
  from saltjax import checkpoints as ckpt_lib

  config = tiny_config(data_cache, compile_cache, fold=FOLD)
  fold_dir = tmp_path / "fold"
  checkpoints = ckpt_lib.FoldCheckpoints(fold_dir, config, asynchronous=True)
  _epoch_save(checkpoints, 1, best_epoch=1)
  _epoch_save(checkpoints, 2, best_epoch=1)
  checkpoints.latest.finish()
  save = ckpt_lib.Store.save

  def slow(self, step, pytree, meta):
    if self is checkpoints.latest and step == 3:
      return  # started, and still being written at the kill
    save(self, step, pytree, meta)

  monkeypatch.setattr(ckpt_lib.Store, "save", slow)
  _epoch_save(checkpoints, 3, best_epoch=3)
  _epoch_save(checkpoints, 4, best_epoch=4, latest=False)
  killed = tmp_path / "killed"
  shutil.copytree(fold_dir, killed)  # what a kill here leaves
  monkeypatch.setattr(ckpt_lib.Store, "save", save)

  assert _steps(killed / "latest") == [2]
  resumed = ckpt_lib.FoldCheckpoints(killed, config)
  _, meta = resumed.latest.restore(2, _tree(0), resumed.fingerprint)
  best, _ = resumed.best.restore(meta["best_epoch"], _tree(0), resumed.fingerprint)
  swa, _ = resumed.swa.restore(2, _tree(0), resumed.fingerprint)
  assert best["params"]["w"].tolist() == [1, 1, 1] and swa["params"]["w"].tolist() == [2, 2, 2]
  resumed.close()
  # Prediction from the killed fold takes the models its resume point names.
  assert ckpt_lib.model_checkpoints(killed, "best+swa") == [("best", 1), ("swa", 2)]

  # Epoch 4's `latest` written and complete: best/1 and swa/2 (and 3) go.
  checkpoints.save_latest(4, _tree(4), {"epoch": 4, "best_epoch": 4, "swa_count": 4})
  checkpoints.finish()
  assert _steps(fold_dir / "latest") == [4]
  assert _steps(fold_dir / "best") == [4]
  assert _steps(fold_dir / "swa") == [4]
  checkpoints.close()


def test_prediction_takes_the_best_model_the_run_recorded(tmp_path, data_cache, compile_cache):
  """best/5, a leftover of an abandoned run, is not taken for the best model: that is
  the step done.json names or, for an unfinished fold, its resume point's best_epoch."""
  import json

  from saltjax import checkpoints as ckpt_lib

  config = tiny_config(data_cache, compile_cache, fold=FOLD)
  checkpoints = ckpt_lib.FoldCheckpoints(tmp_path, config)
  for step in (2, 5):
    checkpoints.save_model("best", step, _tree(step), {"epoch": step})
  for step in (2, 4):  # a cycle end before the resume point, one after it
    checkpoints.save_model("snapshots", step, _tree(step), {"epoch": step})
  checkpoints.save_model("swa", 3, _tree(3), {"epoch": 3})
  checkpoints.save_model("swa", 5, _tree(5), {"epoch": 5})
  checkpoints.save_latest(3, _tree(3), {"epoch": 3, "best_epoch": 2, "swa_count": 2})
  checkpoints.latest.finish()
  checkpoints.close()
  # Unfinished: the resume point (epoch 3) names best/2 and swa/3; snapshots up to it.
  assert ckpt_lib.resume_point(tmp_path)[0] == 3
  assert ckpt_lib.model_checkpoints(tmp_path, "best") == [("best", 2)]
  assert ckpt_lib.model_checkpoints(tmp_path, "swa") == [("swa", 3)]
  assert ckpt_lib.model_checkpoints(tmp_path, "snapshots") == [("snapshots", 2)]
  # Finished: done.json names the best epoch.
  (tmp_path / "done.json").write_text(json.dumps({"best_epoch": 2, "val_score": 0.5}))
  assert ckpt_lib.model_checkpoints(tmp_path, "best+latest") == [("best", 2), ("latest", 3)]
  # A recorded best that is not on disk is no best at all (not another step).
  (tmp_path / "done.json").write_text(json.dumps({"best_epoch": 1, "val_score": 0.5}))
  assert ckpt_lib.model_checkpoints(tmp_path, "best") == []

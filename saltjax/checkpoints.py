"""Orbax checkpoints of one fold: the latest state, the best model, snapshots.

Layout under a fold's directory:
  latest/<epoch>/     full TrainState + meta (resume point; one kept)
  best/<epoch>/       params + batch_stats of the best validation epoch
  snapshots/<cycle>/  params + batch_stats at the end of each cosine cycle
  swa/<epoch>/        the stochastic weight average, when enabled
Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a crash never leaves a half-written checkpoint behind a final
name. Every checkpoint carries the fingerprint of the config that shapes the
model; restoring under a different one is refused with a clear message. Each
step directory also gets a checksums.json (size and SHA-256 of every file),
checked before anything is read, so a truncated, damaged or half-deleted
checkpoint is refused as a whole instead of being half loaded.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from saltjax import data as data_lib


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used: corrupt or from an incompatible config."""


# The config keys whose values decide the shapes and meaning of the weights.
_MODEL_KEYS = ("model", "image_size", "resize_mode")


def fingerprint(config) -> str:
  model = {k: config[k] for k in _MODEL_KEYS}
  model = json.loads(json.dumps(model, default=lambda o: getattr(o, "to_dict", lambda: str(o))()))
  model["model"].pop("pretrained", None)  # where the init came from doesn't matter
  model["model"].pop("dtype", None)
  return hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()[:16]


class _Store:
  """One orbax CheckpointManager holding {'state': pytree, 'meta': json}."""

  def __init__(self, directory: pathlib.Path, max_to_keep: int | None):
    self.directory = directory
    self.manager = ocp.CheckpointManager(
        directory.absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=False),
        item_names=("state", "meta"))

  def save(self, step: int, pytree: Any, meta: dict) -> None:
    if step in self.manager.all_steps():
      # A resumed run redoing the epoch a crash interrupted (say between the
      # `best` and the `latest` save): orbax never overwrites a step.
      self.manager.delete(step)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(pytree), meta=ocp.args.JsonSave(meta)),
        force=True)
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      _write_checksums(self.directory / str(step))

  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, target: Any, expected_fingerprint: str) -> tuple[Any, dict]:
    where = self.directory / str(step)
    _verify_checksums(where)
    try:
      meta = self.meta(step)
    except Exception as e:  # orbax raises many types for unreadable files
      raise CheckpointError(f"checkpoint {where} is unreadable or corrupt: {e}") from e
    if meta.get("fingerprint") != expected_fingerprint:
      raise CheckpointError(
          f"checkpoint {where} was written for another model/input config"
          f" (fingerprint {meta.get('fingerprint')} != {expected_fingerprint});"
          " use a new --workdir or the config the run was started with")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:
      raise CheckpointError(f"checkpoint {where} is corrupt or incomplete: {e}") from e
    return restored, meta

  def close(self):
    self.manager.close()


_CHECKSUMS = "checksums.json"
# Orbax may rewrite its step metadata; the checkpoint reads fine without it.
_UNCHECKED = (_CHECKSUMS, "_CHECKPOINT_METADATA")


def _file_digests(step_dir: pathlib.Path) -> dict[str, list]:
  digests = {}
  for path in sorted(step_dir.rglob("*")):
    if path.is_file() and path.name not in _UNCHECKED:
      sha = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          sha.update(block)
      digests[path.relative_to(step_dir).as_posix()] = [path.stat().st_size, sha.hexdigest()]
  return digests


def _write_checksums(step_dir: pathlib.Path) -> None:
  """Written (atomically) once orbax has finished the step directory."""
  data_lib.write_text_atomic(json.dumps(_file_digests(step_dir), indent=0),
                             step_dir / _CHECKSUMS)


def _verify_checksums(step_dir: pathlib.Path) -> None:
  """Raises CheckpointError unless every file is there, whole and unchanged.

  A step without checksums.json (the process died right after orbax finished
  it) is left to orbax's own checks.
  """
  listed = step_dir / _CHECKSUMS
  if not listed.is_file():
    return
  try:
    expected = json.loads(listed.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"checkpoint {step_dir} is corrupt: unreadable {listed}: {e}") from e
  found = _file_digests(step_dir)
  missing = sorted(set(expected) - set(found))
  changed = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
  if missing or changed:
    details = "; ".join(f"{what}: {', '.join(names[:5])}" for what, names in
                        (("missing", missing), ("damaged", changed)) if names)
    raise CheckpointError(
        f"checkpoint {step_dir} is corrupt or incomplete ({details}); nothing was"
        " loaded from it. Delete that directory to go on without it (training restarts"
        " from an earlier checkpoint, if any), or use a new --workdir")


class FoldCheckpoints:
  """The checkpoints of one fold."""

  def __init__(self, fold_dir: pathlib.Path | str, config):
    fold_dir = pathlib.Path(fold_dir)
    self.fingerprint = fingerprint(config)
    self.latest = _Store(fold_dir / "latest", max_to_keep=1)
    self.best = _Store(fold_dir / "best", max_to_keep=1)
    self.snapshots = _Store(fold_dir / "snapshots", max_to_keep=None)
    # Two kept: a run resumed from `latest` at epoch e restores the average
    # of epoch e even when a crash came after the swa save of epoch e + 1.
    self.swa = _Store(fold_dir / "swa", max_to_keep=2)

  def _meta(self, meta: dict) -> dict:
    return {**meta, "fingerprint": self.fingerprint}

  def save_latest(self, epoch: int, state: Any, meta: dict) -> None:
    self.latest.save(epoch, state, self._meta(meta))

  def save_model(self, store: str, step: int, variables: Any, meta: dict) -> None:
    getattr(self, store).save(step, variables, self._meta(meta))

  def close(self):
    for store in (self.latest, self.best, self.snapshots, self.swa):
      store.close()


def model_checkpoints(fold_dir: pathlib.Path, which: str) -> list[tuple[str, int]]:
  """(store, step) of the model checkpoints `which` selects in a fold dir.

  which: 'best', 'latest', 'snapshots' (falls back to best when the run ended
  before a cycle did), 'swa', or several joined by '+'.
  """
  chosen = []
  for part in which.split("+"):
    part = part.strip()
    if part not in ("best", "latest", "snapshots", "swa"):
      raise ValueError(
          f"unknown config.predict.checkpoints part {part!r}: use best, latest,"
          " snapshots, swa or several joined by '+'")
    directory = fold_dir / part
    # Names that are not all digits are orbax's unfinished (temporary) saves.
    steps = sorted(int(p.name) for p in directory.glob("[0-9]*")
                   if p.is_dir() and p.name.isdigit()) if directory.is_dir() else []
    if part in ("best", "latest", "swa"):
      steps = steps[-1:]
    if not steps and part == "snapshots":
      return model_checkpoints(fold_dir, "best")
    chosen += [(part, s) for s in steps]
  return list(dict.fromkeys(chosen))

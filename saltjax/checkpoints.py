"""Orbax checkpoints of one fold: the latest state, the best model, snapshots.

Layout under a fold's directory:
  latest/<epoch>/     full TrainState + meta (resume point; one kept)
  best/<epoch>/       params + batch_stats of the best validation epoch
  snapshots/<cycle>/  params + batch_stats at the end of each cosine cycle
  swa/<epoch>/        the stochastic weight average, when enabled
A `best` or `swa` step is deleted only once a newer `latest` is complete on
disk and no longer refers to it (`FoldCheckpoints.prune`), so a kill at any
moment leaves a resume point whose models are all there. Which model a fold
predicts with is what its run recorded (`done.json`, else the resume point),
not the highest step on disk (`model_checkpoints`).
Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a crash never leaves a half-written checkpoint behind a final
name. Every checkpoint carries the fingerprint of the config that shapes the
model; restoring under a different one is refused with a clear message. Each
step directory also gets a checksums.json (size and SHA-256 of every file),
checked before anything is read, so a truncated, damaged or half-deleted
checkpoint is refused as a whole instead of being half loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from saltjax import workdir as workdir_lib
from saltjax.errors import CheckpointError, WorkdirError

# The kinds of checkpoint a fold keeps; `config.predict.checkpoints` picks among
# the model stores (all but `latest` hold {params, batch_stats} alone).
STORES = workdir_lib.CHECKPOINT_STORES


# The config keys whose values decide the shapes and meaning of the weights.
_MODEL_KEYS = ("model", "image_size", "resize_mode")


def fingerprint(config) -> str:
  model = {k: config[k] for k in _MODEL_KEYS}
  model = json.loads(json.dumps(model, default=lambda o: getattr(o, "to_dict", lambda: str(o))()))
  model["model"].pop("pretrained", None)  # where the init came from doesn't matter
  model["model"].pop("dtype", None)
  return hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()[:16]


def _first_line(e: BaseException, limit: int = 200) -> str:
  """The gist of a library error (tensorstore's can run to pages)."""
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return text if len(text) <= limit else text[:limit] + "..."


# What tensorstore says for the errno values a user can act on.
_WRITE_FAILURES = (
    ("No space left", errno.ENOSPC),
    ("os_error_code='28'", errno.ENOSPC),
    ("Read-only file system", errno.EROFS),
    ("Permission denied", errno.EACCES),
)


def _describe_write_failure(e: BaseException, directory: pathlib.Path) -> str:
  text = str(e)
  for words, code in _WRITE_FAILURES:
    if words in text:
      return (
          workdir_lib.describe_os_error(OSError(code, os.strerror(code)), directory)
          + "; then run the same command again to resume"
      )
  return (
      f"writing a checkpoint in {directory} failed ({_first_line(e)}); run the same"
      " command again to resume"
  )


def _check_structure(where, wanted: dict, saved: dict, error=None) -> None:
  """CheckpointError naming the differences when the two trees differ."""
  missing = sorted(set(wanted) - set(saved))
  extra = sorted(set(saved) - set(wanted))
  reshaped = sorted(k for k in set(wanted) & set(saved) if wanted[k] != saved[k])
  if missing or extra or reshaped:
    details = "; ".join(
        f"{what}: {', '.join(keys[:3])}"
        for what, keys in (("missing", missing), ("unexpected", extra), ("other shape", reshaped))
        if keys
    )
    raise CheckpointError(
        f"checkpoint {where} is intact but holds a different structure than this"
        f" program expects ({details}); it was written by another version or"
        " model config"
    ) from error


def _tree_shapes(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(getattr(leaf, "shape", ())) for path, leaf in flat}


class Store:
  """One orbax CheckpointManager holding {'state': pytree, 'meta': json}.

  With `asynchronous`, `save` returns once the arrays are copied off the
  device and orbax writes them in the background; `finish` waits for the
  writes (and adds each step's checksums). Until then a crash leaves at most
  an unfinished temporary directory, which orbax never mistakes for a step.
  """

  def __init__(self, directory: pathlib.Path, max_to_keep: int | None, asynchronous: bool = False):
    self.directory = pathlib.Path(directory)
    self._unchecked: list[int] = []  # saved steps still without checksums
    self.manager = ocp.CheckpointManager(
        self.directory.absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=asynchronous,
            # On several hosts orbax syncs each save with named barriers; without
            # a prefix of its own, two stores saving at once (fold_0/best while
            # fold_0/snapshots finishes in the background) use the same name,
            # which the coordination service refuses.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=f"{self.directory.parent.name}.{self.directory.name}"
            ),
        ),
        item_names=("state", "meta"),
    )

  def save(self, step: int, pytree: Any, meta: dict) -> None:
    self.finish()
    try:
      if step in self.manager.all_steps():
        # A resumed run redoing an epoch that a crash interrupted after this
        # store was written: orbax never overwrites a step.
        self.manager.delete(step)
      self.manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(pytree), meta=ocp.args.JsonSave(meta)
          ),
          force=True,
      )
    except OSError as e:
      raise WorkdirError(workdir_lib.describe_os_error(e, self.directory)) from e
    except ValueError as e:  # tensorstore's write errors reach us as ValueError
      raise WorkdirError(_describe_write_failure(e, self.directory)) from e
    self._unchecked.append(step)

  def finish(self) -> None:
    """Waits for pending writes, then writes the checksums of finished steps."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # orbax re-raises the background thread's error
      raise WorkdirError(_describe_write_failure(e, self.directory)) from e
    if jax.process_index() == 0:
      for step in self._unchecked:
        if (self.directory / str(step)).is_dir():
          _write_checksums(self.directory / str(step))
    self._unchecked = []

  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def delete(self, step: int) -> None:
    """Deletes a finished step (every process calls it: orbax syncs them)."""
    try:
      self.manager.delete(step)
    except OSError as e:
      raise WorkdirError(workdir_lib.describe_os_error(e, self.directory / str(step))) from e

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def _checked_meta(self, step: int, expected_fingerprint: str) -> dict:
    where = self.directory / str(step)
    if not where.is_dir():
      raise CheckpointError(
          f"checkpoint {where} is missing (the resume point refers to it); delete"
          f" {self.directory.parent} to train the fold again, or use a new --workdir"
      )
    _verify_checksums(where)
    try:
      meta = self.meta(step)
    except Exception as e:  # orbax raises many types for unreadable files
      raise CheckpointError(
          f"checkpoint {where} is unreadable or corrupt"
          f" ({_first_line(e)}); delete that directory or use a new"
          " --workdir"
      ) from e
    if meta.get("fingerprint") != expected_fingerprint:
      raise CheckpointError(
          f"checkpoint {where} was written for another model/input config"
          f" (fingerprint {meta.get('fingerprint')} != {expected_fingerprint});"
          " use a new --workdir or the config the run was started with"
      )
    return meta

  def restore(self, step: int, target: Any, expected_fingerprint: str) -> tuple[Any, dict]:
    """The step's pytree, shaped as `target`, and its meta."""
    meta = self._checked_meta(step, expected_fingerprint)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
      )["state"]
    except Exception as e:
      self._raise_restore_error(step, target, e)
    return restored, meta

  def restore_raw(self, step: int, expected_fingerprint: str) -> tuple[Any, dict]:
    """The step's pytree as saved (nested dicts of arrays), and its meta."""
    meta = self._checked_meta(step, expected_fingerprint)
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
      )["state"]
    except Exception as e:
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} is corrupt or" f" incomplete ({_first_line(e)})"
      ) from e
    return restored, meta

  def _raise_restore_error(self, step: int, target: Any, error: Exception):
    """A structure mismatch says so; anything else is a damaged checkpoint."""
    where = self.directory / str(step)
    try:
      saved = _tree_shapes(self.manager.item_metadata(step)["state"])
    except Exception:  # the metadata itself is unreadable
      saved = None
    if saved is not None:
      _check_structure(where, _tree_shapes(target), saved, error)
    raise CheckpointError(
        f"checkpoint {where} is corrupt or incomplete"
        f" ({_first_line(error)}); delete that directory or use a new"
        " --workdir"
    ) from error

  def close(self):
    self.finish()
    self.manager.close()


_Store = Store  # the name earlier code used


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
  workdir_lib.write_text(json.dumps(_file_digests(step_dir), indent=0), step_dir / _CHECKSUMS)


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
    details = "; ".join(
        f"{what}: {', '.join(names[:5])}"
        for what, names in (("missing", missing), ("damaged", changed))
        if names
    )
    raise CheckpointError(
        f"checkpoint {step_dir} is corrupt or incomplete ({details}); nothing was"
        " loaded from it. Delete that directory to go on without it (training restarts"
        " from an earlier checkpoint, if any), or use a new --workdir"
    )


class FoldCheckpoints:
  """The checkpoints of one fold.

  `best` and `swa` keep every step that a resume point on disk may still
  refer to: the resume point `latest/<e>` restores the best model of its meta
  `best_epoch` and the weight average `swa/<e>`. A step of either is deleted
  only once a newer `latest` is complete and no longer refers to it
  (`prune`); until then the older, complete `latest` and its models stay, so a
  kill while a `latest` is still being written (in the background) leaves a
  fold that resumes. Steps above the complete resume point's epoch (written
  for a `latest` still on its way, or left by an abandoned run) are kept until
  a complete resume point reaches past them.
  """

  def __init__(self, fold_dir: pathlib.Path | str, config, asynchronous: bool = False):
    fold_dir = pathlib.Path(fold_dir)
    self.fingerprint = fingerprint(config)
    self.latest = Store(fold_dir / "latest", max_to_keep=1, asynchronous=asynchronous)
    self.best = Store(fold_dir / "best", max_to_keep=None, asynchronous=asynchronous)
    self.snapshots = Store(fold_dir / "snapshots", max_to_keep=None, asynchronous=asynchronous)
    self.swa = Store(fold_dir / "swa", max_to_keep=None, asynchronous=asynchronous)
    self._writing: tuple[int, dict] | None = None  # the `latest` not yet known complete

  def stores(self) -> tuple[Store, ...]:
    return (self.latest, self.best, self.snapshots, self.swa)

  def _meta(self, meta: dict) -> dict:
    return {**meta, "fingerprint": self.fingerprint}

  def save_latest(self, epoch: int, state: Any, meta: dict) -> None:
    """Starts writing the resume point; the previous one is finished (and pruned after) first."""
    self._finish_latest()
    self._writing = (epoch, meta)
    self.latest.save(epoch, state, self._meta(meta))

  def save_model(self, store: str, step: int, variables: Any, meta: dict) -> None:
    getattr(self, store).save(step, variables, self._meta(meta))

  def _finish_latest(self) -> None:
    """Waits for the `latest` being written; once it is complete, prunes by it."""
    self.latest.finish()
    if self._writing is not None:
      epoch, meta = self._writing
      self._writing = None
      if epoch in self.latest.steps():
        self.prune(epoch, meta)

  def prune(self, epoch: int, meta: dict) -> None:
    """Deletes the `best` and `swa` steps the complete resume point `latest/<epoch>`
    (its meta: `best_epoch`, `swa_count`) no longer refers to, up to its epoch."""
    keep = {
        "best": meta.get("best_epoch"),
        "swa": epoch if meta.get("swa_count") else None,
    }
    for name, wanted in keep.items():
      store = getattr(self, name)
      store.finish()
      for step in store.steps():
        if step <= epoch and step != wanted:
          store.delete(step)

  def finish(self) -> None:
    for store in (self.best, self.snapshots, self.swa):
      store.finish()
    self._finish_latest()

  def close(self):
    self.finish()
    for store in self.stores():
      store.close()


def _steps_on_disk(directory: pathlib.Path) -> list[int]:
  # Names that are not all digits are orbax's unfinished (temporary) saves.
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def last_complete_epoch(fold_dir: pathlib.Path) -> int | None:
  """The epoch of a fold's last complete resume point, from directory names alone:
  no orbax, so safe in a process about to end (saltjax.app.host_loss)."""
  steps = _steps_on_disk(pathlib.Path(fold_dir) / "latest")
  return steps[-1] if steps else None


def resume_point(fold_dir: pathlib.Path) -> tuple[int, dict] | None:
  """(epoch, meta) of a fold's complete resume point (`latest`), or None.

  Read without checking the weights (prediction and its checks want the
  record alone); a meta that cannot be read is a CheckpointError naming it.
  """
  steps = _steps_on_disk(pathlib.Path(fold_dir) / "latest")
  if not steps:
    return None
  store = Store(pathlib.Path(fold_dir) / "latest", max_to_keep=None)
  try:
    meta = store.meta(steps[-1])
  except Exception as e:  # orbax raises many types for unreadable files
    raise CheckpointError(
        f"checkpoint {store.directory / str(steps[-1])} is unreadable or corrupt"
        f" ({_first_line(e)}); delete that directory or use a new --workdir"
    ) from e
  finally:
    store.manager.close()
  return steps[-1], meta


def _read_done(fold_dir: pathlib.Path) -> dict | None:
  path = pathlib.Path(fold_dir) / workdir_lib.DONE_JSON
  return json.loads(path.read_text()) if path.is_file() else None


def model_checkpoints(fold_dir: pathlib.Path, which: str) -> list[tuple[str, int]]:
  """(store, step) of the model checkpoints `which` selects in a fold dir.

  which: 'best', 'latest', 'snapshots' (falls back to best when the run ended
  before a cycle did), 'swa', or several joined by '+'. Empty when the fold
  holds none of them.

  The models are those the run recorded, not the highest steps on disk
  (which, after a crash and a resume that went another way, may be leftovers
  of the abandoned run): `best` is the step the fold's done.json names or,
  for a fold that never finished, its resume point's `best_epoch`; for an
  unfinished fold, `swa` is the resume point's average and `snapshots` are
  those up to its epoch. A fold with neither record (killed before its first
  resume point) offers the highest steps on disk.
  """
  fold_dir = pathlib.Path(fold_dir)
  parts = [part.strip() for part in which.split("+")]
  for part in parts:
    if part not in STORES:
      raise CheckpointError(
          f"unknown config.predict.checkpoints part {part!r}: use"
          f" {', '.join(STORES)} or several joined by '+'"
      )
  done = _read_done(fold_dir)
  point = resume_point(fold_dir) if done is None and set(parts) != {"latest"} else None
  if done is not None:
    best = done.get("best_epoch")
  elif point is not None:
    best = point[1].get("best_epoch")
  else:
    best = None  # nothing recorded: the highest step on disk

  def recorded_best(steps):
    if best is None:
      return steps[-1:]
    return [best] if best in steps else []

  chosen = []
  for part in parts:
    steps = _steps_on_disk(fold_dir / part)
    if point is not None and part in ("snapshots", "swa"):
      steps = [s for s in steps if s <= point[0]]
      if part == "swa" and not point[1].get("swa_count"):
        steps = []
    if part == "best":
      steps = recorded_best(steps)
    elif part in ("latest", "swa"):
      steps = steps[-1:]
    if not steps and part == "snapshots":
      steps, part = recorded_best(_steps_on_disk(fold_dir / "best")), "best"
    chosen += [(part, s) for s in steps]
  return list(dict.fromkeys(chosen))


def restore_variables(
    fold_dir: pathlib.Path, store: str, step: int, target: Any, expected_fingerprint: str
) -> dict:
  """{params, batch_stats} of a fold's checkpoint, shaped as `target`.

  `latest` holds the whole train state (optimiser moments too); its model
  variables are taken out of it.
  """
  manager = Store(pathlib.Path(fold_dir) / store, max_to_keep=None)
  try:
    if store != "latest":
      return manager.restore(step, target, expected_fingerprint)[0]
    raw, _ = manager.restore_raw(step, expected_fingerprint)
    variables = {"params": raw.get("params") or {}, "batch_stats": raw.get("batch_stats") or {}}
    _check_structure(manager.directory / str(step), _tree_shapes(target), _tree_shapes(variables))
    return jax.tree.map(lambda t, v: jax.numpy.asarray(v, t.dtype), target, variables)
  finally:
    manager.manager.close()

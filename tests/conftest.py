"""Shared fixtures: tiny configs of the real recipe, and a session compile cache."""

import atexit
import dataclasses
import gc
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Compile-time savers for the whole suite, its subprocesses included (they
# inherit the environment): XLA's CPU compiler spends most of a tiny model's
# test optimizing the generated machine code, and these cut a tiny train
# step's compile from ~15 s to ~4 s. They lower the effort spent on the CPU
# code (LLVM's optimization level, the newer fusion emitters), not what the
# HLO computes; every run a test compares gets the same ones.
SUITE_XLA_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
)
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *SUITE_XLA_FLAGS]).strip()

# One home directory for the whole suite (the workers and every process they
# start inherit it), made fresh for each run: the configs' default caches
# (~/.cache/saltjax, its jax_cache) are then the suite's own, so no test reads
# or writes the user's, and a working copy runs as cold as a clean clone in CI.
# The suite's compilation cache is that home's jax_cache, so a program compiled
# by one test or process is loaded by the next whichever config path it came
# through. Every program is cached, not only those that took 1 s to compile.
if "SALTJAX_SUITE_HOME" not in os.environ:
  os.environ["SALTJAX_SUITE_HOME"] = tempfile.mkdtemp(prefix="saltjax-suite-home-")
  atexit.register(shutil.rmtree, os.environ["SALTJAX_SUITE_HOME"], True)
os.environ["HOME"] = os.environ["SALTJAX_SUITE_HOME"]
SUITE_JAX_CACHE = pathlib.Path(os.environ["HOME"], ".cache", "saltjax", "jax_cache")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

# The test processes collect garbage as main.py does: tracing leaves hundreds
# of thousands of long-lived objects (the jit caches' programs), and at
# Python's defaults each full collection over them took ~0.6 s, 30 times in a
# worker's four minutes.
from main import GC_THRESHOLDS  # noqa: E402  (main.py defines its flags, parses none)

gc.set_threshold(*GC_THRESHOLDS)

# Tiny sizes of the same code path: a one-block-per-stage encoder, 64x64 input.
TINY_OVERRIDES = {
    "synthetic.num_train": 48,
    "synthetic.num_test": 12,
    "num_folds": 2,
    "image_size": 64,
    "model.stage_sizes": (1, 1, 1, 1),
    "model.encoder_width": 4,
    "model.decoder_channels": (16, 8, 8, 8, 8),
    "model.scse_reduction": 4,
    "batch_size": 8,
    "eval_batch_size": 8,
    "predict.batch_size": 8,
    "num_epochs": 3,
    "schedule.cycle_epochs": 2,
    "optimizer.learning_rate": 3e-3,
    "log_every_steps": 2,
    "progress": False,
    # Every epoch, so that a test can stop a run anywhere and find its resume point.
    "checkpoint_every_seconds": 0,
    # Folds together (fold.py's default; quick.py trains them in turn on a CPU).
    "parallel_folds": 0,
}


@pytest.fixture(scope="session")
def compile_cache():
  SUITE_JAX_CACHE.mkdir(parents=True, exist_ok=True)
  return str(SUITE_JAX_CACHE)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("saltjax_cache"))


def tiny_config(data_cache, compile_cache, **overrides):
  from configs import quick

  config = quick.get_config()
  for key, value in {**TINY_OVERRIDES, **overrides}.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  config.cache_dir = data_cache
  config.compilation_cache = compile_cache
  return config


def flag_args(**overrides):
  """--config.key=value arguments for main.py."""
  args = []
  for key, value in {**TINY_OVERRIDES, **overrides}.items():
    if isinstance(value, tuple):
      value = "(" + ",".join(map(str, value)) + ",)"
    args.append(f"--config.{key}={value}")
  return args


def with_sitecustomize(directory: pathlib.Path, code: str) -> dict:
  """The environment of a Python subprocess that runs `code` first, at start-up
  (a `sitecustomize` module in `directory`, put on its PYTHONPATH)."""
  directory.mkdir()
  (directory / "sitecustomize.py").write_text(code)
  return {
      "PYTHONPATH": os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))
  }


def run_python(args, timeout=600, env=None):
  """This interpreter on `args` (a script or `-c` code, then its arguments), in the
  repository, JAX on the CPU, in the suite's environment plus `env`; output captured."""
  return subprocess.run(
      [sys.executable, *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
      env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
  )


def run_main(args, timeout=600, env=None):
  return run_python([str(REPO / "main.py"), *args], timeout, env)


def step_config(batch_size: int, image_size: int):
  """configs/quick.py shrunk for comparing single train steps: same code path,
  seconds to compile, float32 sums, and SGD (whose update is linear in the
  gradient, unlike Adam's sign-like first step)."""
  from configs import quick

  config = quick.get_config()
  config.model.stage_sizes = (1, 1, 1, 1)
  config.model.encoder_width = 4
  config.model.decoder_channels = (8, 8, 8, 8, 8)
  config.model.scse_reduction = 4
  config.model.dtype = "float32"
  config.image_size = image_size
  config.batch_size = batch_size
  config.eval_batch_size = batch_size
  config.optimizer.name = "sgd"
  return config


def blob_batch(rng: np.random.Generator, batch_size: int, image_size: int) -> dict:
  """Noise images whose masks are discs, two of them empty: BCE + Dice see
  realistic masks, and the empty ones exercise Dice's smoothing term."""
  images = rng.uniform(size=(batch_size, image_size, image_size, 1)).astype(np.float32)
  yy, xx = np.mgrid[:image_size, :image_size]
  centres = rng.uniform(8, image_size - 8, size=(batch_size, 2))
  radii = rng.uniform(4, 20, size=batch_size)
  masks = (
      (yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2
      < radii[:, None, None] ** 2
  ).astype(np.float32)
  masks[:2] = 0.0
  return {"image": images, "mask": masks}


# ------------------------------------- the suite's reference training run ---
# One tiny training configuration (fold 0 of conftest's sizes) is run once by
# main.py for the session; the reliability and checkpoint tests compare with
# it and reuse the compile cache it fills.

FOLD = 0
EPOCHS = 3  # TINY_OVERRIDES' num_epochs: the train step compiled here is the suite's


def _main_args(workdir, data_cache, compile_cache, **overrides) -> list[str]:
  return [
      "--config=configs/quick.py",
      f"--workdir={workdir}",
      f"--config.cache_dir={data_cache}",
      f"--config.compilation_cache={compile_cache}",
      *flag_args(**{"fold": FOLD, **overrides}),
  ]


def _popen_main(args, log: pathlib.Path, env=None, hook: str | None = None) -> subprocess.Popen:
  """main.py started in the background; `hook` runs first, in the same process."""
  command = ["-c", hook] if hook else [str(REPO / "main.py")]
  with open(log, "w") as stderr:
    return subprocess.Popen(
        [sys.executable, *command, *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
    )


# main.py, paused for good when epoch 2's third batch (0-based epoch 1, batch
# 2) is handed to the train step, after the marker file says so: the place to
# SIGKILL it mid-epoch, two of that epoch's steps applied. Pausing only
# delays the data; what is computed is unchanged.


def _steps(store_dir: pathlib.Path) -> list[int]:
  """Finished checkpoint steps (orbax's unfinished saves have other names)."""
  if not store_dir.is_dir():
    return []
  return sorted(int(p.name) for p in store_dir.iterdir() if p.name.isdigit())


def _without_seconds(record: dict) -> dict:
  """A summary or meta without the timings, which rightly differ between runs."""
  out = dict(record)
  if "history" in out:
    timings = ("seconds", "images_per_second")
    out["history"] = [{k: v for k, v in h.items() if k not in timings} for h in out["history"]]
  return out


# _checkpoints' results by fold dir, with the state of its files they were read
# from: restoring every checkpoint of a fold takes orbax about half a second
# each, and the reference run's are compared with many runs.
_CHECKPOINTS_READ: dict = {}


def _files_state(directory: pathlib.Path) -> tuple:
  files = [(p, p.stat()) for p in directory.rglob("*") if p.is_file()]
  return tuple(
      sorted((str(p.relative_to(directory)), st.st_size, st.st_mtime_ns) for p, st in files)
  )


def _checkpoints(fold_dir: pathlib.Path) -> dict:
  """{'store/step': (leaf path -> (dtype, shape, bytes), meta)} of a fold dir.

  Read again only when a file of the dir changed since the last read."""
  key, state = str(pathlib.Path(fold_dir).absolute()), _files_state(pathlib.Path(fold_dir))
  if key in _CHECKPOINTS_READ and _CHECKPOINTS_READ[key][0] == state:
    return dict(_CHECKPOINTS_READ[key][1])
  out = _read_checkpoints(fold_dir)
  _CHECKPOINTS_READ[key] = (state, out)
  return dict(out)


def _read_checkpoints(fold_dir: pathlib.Path) -> dict:
  import jax
  import orbax.checkpoint as ocp

  out = {}
  for store in ("latest", "best", "snapshots", "swa"):
    if not _steps(fold_dir / store):
      continue
    manager = ocp.CheckpointManager(
        (fold_dir / store).absolute(),
        item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    for step in manager.all_steps():
      restored = manager.restore(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
      )
      leaves = {}
      for path, leaf in jax.tree_util.tree_flatten_with_path(restored["state"])[0]:
        leaf = np.asarray(leaf)
        leaves[jax.tree_util.keystr(path)] = (str(leaf.dtype), leaf.shape, leaf.tobytes())
      out[f"{store}/{step}"] = (leaves, _without_seconds(restored["meta"]))
    manager.close()
  return out


@pytest.fixture(scope="session")
def prepared_data(data_cache):
  """The tiny synthetic set, generated once before processes race for it."""
  from saltjax.data import dataset as data_lib

  return data_lib.load(tiny_config(data_cache, ""))


@pytest.fixture(scope="session")
def reference_started(tmp_path_factory, prepared_data, data_cache, compile_cache):
  """The uninterrupted run, started early (it compiles what every other run reuses)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  proc = _popen_main(_main_args(workdir, data_cache, compile_cache), workdir.parent / "stderr.txt")
  yield workdir, proc
  if proc.poll() is None:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="session")
def reference(reference_started):
  workdir, proc = reference_started
  rc = proc.wait(timeout=900)
  assert rc == 0, (workdir.parent / "stderr.txt").read_text()[-3000:]
  return workdir


@pytest.fixture(scope="session")
def trained_job(tmp_path_factory, prepared_data, data_cache, compile_cache):
  """`main.py --config=configs/quick.py` at conftest's sizes, every fold, once for
  the session: trained, predicted, submitted. Tests read it; to change it, copy it."""
  workdir = tmp_path_factory.mktemp("trained_job") / "run"
  result = run_main(
      [
          "--config=configs/quick.py",
          f"--workdir={workdir}",
          f"--config.cache_dir={data_cache}",
          f"--config.compilation_cache={compile_cache}",
          *flag_args(),
      ]
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope="session")
def job_cache():
  return {}


@pytest.fixture
def shared_job(job_cache, monkeypatch):
  """In-process runs share one Job (traced and compiled once), as one process's folds do."""
  from saltjax.training.job import Job

  create = Job.create

  def shared(config, mesh, fold_of, writer, num_extra=0):
    key = config.to_json_best_effort(sort_keys=True)
    if key not in job_cache:
      job_cache[key] = create(config, mesh, fold_of, writer=None, num_extra=num_extra)
    return dataclasses.replace(job_cache[key], writer=writer)

  monkeypatch.setattr(Job, "create", shared)


# ------------------------------------- float32 parity: what reduction order moves ---

F32_EPS = float(np.finfo(np.float32).eps)


def reduction_order_tolerance(num_terms: int, scale: float) -> float:
  """How far two float32 summation orders can move a mean of `num_terms` terms.

  Each order's computed sum is within gamma_(n-1) * sum|x_i| of the exact one
  (Higham, Accuracy and Stability of Numerical Algorithms, section 4.2:
  gamma_k = k u / (1 - k u), u = eps / 2), so two orders differ by at most
  about n * eps * (mean of |x_i|), and `scale` bounds that mean. The parity
  tests compare one step on several devices or processes with one device:
  gradients are means over the batch's pixels (num_terms = batch * height *
  width at the stem, the largest sum of the model), so the gradients may
  differ by reduction_order_tolerance(n, max |gradient|) and one SGD step's
  parameters by reduction_order_tolerance(n, learning rate * max |gradient|)
  = reduction_order_tolerance(n, the largest parameter move). Loss and
  BatchNorm statistics are means over the same pixels: the tolerance of their
  own size. A real error (a shard dropped or counted twice, statistics per
  device) moves them by a share of their size, not of eps.
  """
  return num_terms * F32_EPS * scale


def flat_leaves(tree, prefix: str = "") -> dict[str, np.ndarray]:
  """{prefix + "['path']['to']['leaf']": array} of a pytree, on the host: the
  keys that parity_mismatches and step_mismatches compare."""
  import jax

  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
  return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def parity_mismatches(
    ours: dict, reference: dict, keys, num_terms: int, scale: float | None = None
) -> list[str]:
  """The leaves of `keys` that differ by more than float32 reduction order allows.

  |ours - reference| <= reduction_order_tolerance(num_terms, scale) + 2 eps |reference|
  (the last for rounding the result itself); `scale` is the leaf's own largest
  magnitude when None.
  """
  bad = []
  for key in keys:
    a, b = np.asarray(ours[key], np.float64), np.asarray(reference[key], np.float64)
    size = float(np.max(np.abs(b))) if scale is None else scale
    allowed = reduction_order_tolerance(num_terms, size) + 2 * F32_EPS * np.abs(b)
    excess = np.abs(a - b) - allowed
    if np.any(excess > 0):
      bad.append(
          f"{key}: max |difference| {np.max(np.abs(a - b)):.3g}, allowed {np.max(allowed):.3g}"
      )
  return bad


def step_mismatches(
    ours: dict, reference: dict, init: dict, num_terms: int, steps: int = 1
) -> list[str]:
  """Where `ours` is further from `reference` than float32 reduction order allows.

  All three map "['params']...", "['batch_stats']..." keys (and "loss", in the
  first two) to values after `steps` SGD steps from `init`. Each of the
  `steps` steps may add the tolerance once. Scales (see
  reduction_order_tolerance): parameters, the largest move of any parameter
  (lr * |gradient|, summed over steps); the loss, its own size; a BatchNorm
  layer's running mean and variance, (1 - momentum^steps) * max(batch variance
  + batch mean^2), the size of the sums of x and x^2 they come from.
  """
  from saltjax.model.layers import BATCH_NORM_MOMENTUM

  params = [k for k in reference if k.startswith("['params']")]
  moved = max(float(np.max(np.abs(reference[k] - init[k]))) for k in params)
  assert moved > 0, "the step did not move the parameters"
  bad = parity_mismatches(ours, reference, params, steps * num_terms, moved)
  if "loss" in reference:
    bad += parity_mismatches(ours, reference, ["loss"], num_terms)
  kept = BATCH_NORM_MOMENTUM**steps
  for key in reference:
    if key.startswith("['batch_stats']") and key.endswith("['mean']"):
      var = key[: -len("['mean']")] + "['var']"
      batch_mean = reference[key] / (1 - kept)
      batch_var = (reference[var] - kept * init[var]) / (1 - kept)
      scale = (1 - kept) * float(np.max(batch_var + batch_mean**2))
      bad += parity_mismatches(ours, reference, [key, var], steps * num_terms, scale)
  return bad


# ------------------------------- pytest-xdist: two workers, heaviest first ---
# pytest.ini runs the suite on two pytest-xdist workers, a unit at a time
# (`--dist loadfile`; `-n 0` runs it in one process). A unit is a test file,
# or the files that read one session fixture: a worker runs a unit whole, so a
# module-scoped set-up (a trained model, a two-process job) or the shared
# session fixture (the reference run, the trained job) is made once. Units are
# handed out heaviest first, by their measured serial seconds on a 2-core
# machine (a long one left to the end would keep one worker busy while the
# other idles), the rest after them in collection order.

# Files that share a session fixture, in the order they run within their unit:
# test_reliability first (its first tests start the reference run and overlap
# with it).
SHARED_UNITS = {
    "test_reliability": "reference",
    "test_checkpoints": "reference",
    "test_end_to_end": "trained_job",
    "test_predict": "trained_job",
}
HEAVY_UNITS = (
    "test_host_loss",  # ~130 s, five two-process launches and two 20 s waits beside them
    "reference",  # test_reliability + test_checkpoints, ~175 s
    "test_compile_only",  # ~90 s, XLA's TPU compiler
    "trained_job",  # test_end_to_end + test_predict, ~100 s
    "test_train",  # ~85 s
    "test_benchmarks",  # ~70 s
    "test_sections",  # ~57 s
    "test_parallel",  # ~41 s
    "test_epoch_program",  # ~40 s
    "test_multihost",  # ~25 s, three processes at once
    "test_imagenet_weights",  # ~25 s
)


def _file_of(nodeid: str) -> str:
  return pathlib.PurePosixPath(nodeid.split("::")[0]).stem


def unit_of(nodeid: str) -> str:
  """The unit of work a test belongs to: its file, or its files' shared unit."""
  name = _file_of(nodeid)
  return SHARED_UNITS.get(name, name)


def pytest_collection_modifyitems(config, items):
  rank = {unit: i for i, unit in enumerate(HEAVY_UNITS)}
  within_unit = {name: i for i, name in enumerate(SHARED_UNITS)}

  def order(item):
    return rank.get(unit_of(item.nodeid), len(rank)), within_unit.get(_file_of(item.nodeid), 0)

  # sorted() is stable: a file's tests keep their order.
  items[:] = sorted(items, key=order)


def pytest_xdist_make_scheduler(config, log):
  """`--dist loadfile`, with the files of SHARED_UNITS together."""
  if config.getvalue("dist") != "loadfile":
    return None
  from xdist.scheduler import LoadScopeScheduling

  class FileUnits(LoadScopeScheduling):

    def _split_scope(self, nodeid: str) -> str:
      return unit_of(nodeid)

  return FileUnits(config, log)

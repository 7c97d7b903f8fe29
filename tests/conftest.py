"""Shared fixtures: tiny configs of the real recipe, and a session compile cache."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

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
}


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


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


def run_main(args, timeout=600, env=None):
  return subprocess.run(
      [sys.executable, str(REPO / "main.py"), *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
      env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
  )


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

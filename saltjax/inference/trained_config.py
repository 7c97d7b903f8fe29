"""The config a prediction (or a segmentation) runs with: the workdir's training config.

A trained model's settings (model, input size, data) come from the
config.json its training run wrote; the command line gives the `predict`
(and `segment`) sections. The merged config is checked by the caller
(`saltjax.app.config_checks.check`).
"""

from __future__ import annotations

import json
import logging
import pathlib

import ml_collections

from saltjax import workdir as workdir_lib
from saltjax.errors import ConfigError

# Keys a prediction takes from the command line; every other one comes from
# the workdir's training config.
_PREDICTION_KEYS = (
    "predict",
    "mode",
    "progress",
    "compilation_cache",
    "distributed",
    "distributed_heartbeat_timeout_seconds",
    "distributed_initialization_timeout_seconds",
    "data_dir",
    "segment",
)


def flatten(d: dict, prefix: str = "") -> dict:
  """{'a.b': value} of a nested dict (tuples as lists, as JSON holds them)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def config_for_prediction(
    config, workdir: pathlib.Path, defaults=None
) -> ml_collections.ConfigDict:
  """The workdir's training config with this config's `predict` section.

  `--config.data_dir` names another directory whose test images to predict
  (the out-of-fold part still comes from the training data). Other values
  given on the command line (those that differ from `defaults`, the config
  file's own values) cannot change a trained model: each is named in a
  warning, never silently dropped. The result is not checked here: the
  caller checks it (`saltjax.app.config_checks.check`).
  """
  saved = pathlib.Path(workdir) / workdir_lib.CONFIG_JSON
  if not saved.exists():
    raise ConfigError(
        f"{saved} not found: --workdir must be a directory that a training"
        " run (configs/fold.py or configs/quick.py) wrote"
    )
  trained = ml_collections.ConfigDict(json.loads(saved.read_text()))
  if defaults is not None:
    given = flatten(json.loads(config.to_json_best_effort()))
    default = flatten(json.loads(defaults.to_json_best_effort()))
    ignored = sorted(
        k for k in given if k.split(".")[0] not in _PREDICTION_KEYS and given[k] != default.get(k)
    )
    for key in ignored:
      logging.warning(
          "config.%s=%r is ignored: the model and data settings of a" " prediction come from %s",
          key,
          given[key],
          saved,
      )
  with trained.unlocked():
    trained.predict = config.predict
    trained.mode = config.mode
    trained.progress = config.progress
    if "segment" in config:
      trained.segment = config.segment
    trained.predict_data_dir = ""
    if config.data_dir and config.data_dir != trained.get("data_dir", ""):
      trained.predict_data_dir = config.data_dir
  for key in ("stage_sizes", "decoder_channels"):
    trained.model[key] = tuple(trained.model[key])
  return trained

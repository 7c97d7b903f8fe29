"""Ensemble what a workdir holds: every trained fold's snapshots, flip TTA.

python main.py --config=configs/predict.py --workdir=runs/x

The model and data settings come from the workdir's own config.json. Of this
config, the `predict` section (which checkpoints, TTA, threshold), `mode`,
`progress`, `compilation_cache` and `distributed` are used, and
`--config.data_dir` names another directory whose test images to predict;
any other value given on the command line is named in a warning and ignored.
"""

from configs import fold


def get_config():
  config = fold.get_config()
  config.mode = "predict"
  return config

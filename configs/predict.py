"""Ensemble what a workdir holds: every trained fold's checkpoints, flip TTA.

python main.py --config=configs/predict.py --workdir=runs/x

The model and data settings come from the workdir's own config.json; only the
`predict` section (and `mode`) of this config is used.
"""

from configs import fold


def get_config():
  config = fold.get_config()
  config.mode = "predict"
  return config

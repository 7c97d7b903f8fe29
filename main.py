"""Trains and/or predicts as the config says.

python main.py --config=configs/fold.py [--config.fold=2] [--workdir=runs/x]
python main.py --config=configs/predict.py --workdir=runs/x
"""

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "workdir",
    None,
    "Directory for checkpoints, logs and outputs" " (default: runs/<config file name>).",
)
config_flags.DEFINE_config_file("config", "configs/fold.py", "Run configuration.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from saltjax import run  # imported after flag parsing: keeps --help fast

  return run.main(FLAGS.config, FLAGS.workdir, config_flags.get_config_filename(FLAGS["config"]))


if __name__ == "__main__":
  app.run(main)

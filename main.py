"""Trains and/or predicts as the config says.

python main.py --config=configs/fold.py [--config.fold=2] [--workdir=runs/x]
python main.py --config=configs/predict.py --workdir=runs/x
"""

import gc

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

# Garbage collection, tuned for a process that traces and compiles large programs
# and then keeps them: at Python's default thresholds (700, 10, 10) a tiny CPU
# run made about 11 full collections over its half a million long-lived objects,
# 2 of its 20 CPU-seconds; these thresholds collect the same garbage less often.
GC_THRESHOLDS = (50_000, 20, 100)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  gc.set_threshold(*GC_THRESHOLDS)
  from saltjax.app import run  # imported after flag parsing: keeps --help fast

  try:
    return run.main(FLAGS.config, FLAGS.workdir, config_flags.get_config_filename(FLAGS["config"]))
  finally:
    # The interpreter ends with full garbage collections over every object
    # still alive: after a run, over half a million (the traced programs,
    # TensorFlow's and JAX's modules), about 2.5 s of CPU for a process that
    # is ending anyway. Frozen objects are left out of them.
    gc.freeze()


if __name__ == "__main__":
  app.run(main)

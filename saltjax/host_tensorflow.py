"""TensorFlow as saltjax uses it: on the host only, to read and feed data.

saltjax's modules import TensorFlow from here (`from saltjax.host_tensorflow
import tf`), so that its first import, wherever that happens, also hides every
accelerator from it: JAX owns them, and a TensorFlow that initialised CUDA
would reserve most of their memory for itself. Its start-up banners (oneDNN,
absl's pre-init warning) are noise to a user. Importing it only where data is
read or written keeps a run that stops at a config error quick: TensorFlow's
import is about 6 s of CPU.
"""

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow as tf  # noqa: E402  (after the environment it reads at import)


def _hide_accelerators() -> None:
  try:
    tf.config.set_visible_devices([], "GPU")
    if tf.config.list_physical_devices("TPU"):
      tf.config.set_visible_devices([], "TPU")
  except RuntimeError:
    # TensorFlow's devices were initialised before saltjax imported it; whoever
    # did that chose the visible devices already, and they cannot change now.
    logging.warning("TensorFlow was initialised before saltjax imported it; it may use a GPU.")


_hide_accelerators()

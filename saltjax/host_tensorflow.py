"""TensorFlow as saltjax uses it: on the host only, to read and feed data.

saltjax's modules import TensorFlow from here (`from saltjax.host_tensorflow
import tf`), so that its first import, wherever that happens, also hides every
accelerator from it: JAX owns them, and a TensorFlow that initialised CUDA
would reserve most of their memory for itself. Its start-up banners (oneDNN,
absl's pre-init warning) are noise to a user. Importing it only where data is
read or written keeps a run that stops at a config error quick: TensorFlow's
import is about 5 s of CPU.
"""

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# TensorFlow's import also imports Keras's optimizers, to register them for
# SavedModel (tensorflow/__init__.py; skipped there when that import fails):
# Keras, scikit-learn's wrappers and SciPy's statistics, about 2 of its 6
# CPU-seconds. saltjax uses neither Keras nor SavedModel. Blocked for
# TensorFlow's import only: a later `import keras` (or `tf.keras`, which
# TensorFlow loads lazily) works as usual. No saltjax run loads Keras: the
# metrics go to TensorBoard through `tf.summary` (saltjax.app.job).
_KERAS_OPTIMIZERS = "keras.src.optimizers"
_blocked = _KERAS_OPTIMIZERS not in sys.modules
if _blocked:
  sys.modules[_KERAS_OPTIMIZERS] = None  # an ImportError for TensorFlow's eager load
try:
  import tensorflow as tf  # noqa: E402  (after the environment it reads at import)
finally:
  if _blocked and sys.modules.get(_KERAS_OPTIMIZERS, 0) is None:
    del sys.modules[_KERAS_OPTIMIZERS]


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

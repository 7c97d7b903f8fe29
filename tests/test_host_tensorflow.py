"""saltjax.host_tensorflow: TensorFlow imported for the host's data work only."""

from tests.conftest import run_python

# In a fresh interpreter: TensorFlow as saltjax imports it, then Keras as a
# user's own code would import it in the same process.
_IMPORTS = """
import sys
from saltjax.host_tensorflow import tf
print("keras before:", "keras" in sys.modules, "sklearn" in sys.modules)
print("gpus visible:", tf.config.get_visible_devices("GPU"))
print("dataset:", [int(x) for x in tf.data.Dataset.range(3).as_numpy_iterator()])
import keras
print("keras after:", keras.optimizers.Adam.__module__, tf.keras.optimizers.Adam is keras.optimizers.Adam)
"""


def test_tensorflow_is_imported_without_keras_which_still_imports_later():
  result = run_python(["-c", _IMPORTS], timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  # TensorFlow's eager load of Keras's optimizers (and with them scikit-learn
  # and SciPy) is skipped; its accelerators are hidden; tf.data works.
  assert "keras before: False False" in lines, result.stdout
  assert "gpus visible: []" in lines, result.stdout
  assert "dataset: [0, 1, 2]" in lines, result.stdout
  # Nothing left blocked: Keras imports, and tf.keras is that Keras.
  assert "keras after: keras.src.optimizers.adam True" in lines, result.stdout

"""Training batches: the augment spec, the tf.data pipeline, the on-device pipeline."""

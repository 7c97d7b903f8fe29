"""The data layer: the Kaggle layout, RLE, folds, the synthetic generator, TFDS builders."""

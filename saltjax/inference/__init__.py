"""Prediction: the fold and snapshot ensemble, post-processing, the submission."""

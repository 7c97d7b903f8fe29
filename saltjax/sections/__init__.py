"""Whole-section segmentation: inputs, amplitude, scale, tiling, truth, SEG-Y."""

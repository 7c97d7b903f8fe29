"""saltjax: U-Net (ResNet50 + scSE) salt segmentation for the TGS Salt Identification data."""

__version__ = "0.1.0"

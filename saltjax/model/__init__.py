"""The U-Net with a ResNet encoder and scSE, ImageNet weights, the forward pass with TTA."""

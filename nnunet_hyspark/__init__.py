"""nnunet-hyspark: self-supervised pre-training of hybrid CNN/ViT networks for nnU-Net v2."""

__version__ = "0.1.0"

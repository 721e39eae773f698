"""Networks: the hybrid CNN/ViT encoder, its fine-tuning U-Net and the pre-training models."""

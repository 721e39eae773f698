"""The pre-training stage: loop, checkpoints, previews and export, shared by every SSL method."""

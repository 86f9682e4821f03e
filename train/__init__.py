"""The DINOv2 trainer: models, heads, losses, augmentations, data, loop, eval."""

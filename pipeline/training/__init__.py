"""The train stage: the training loop, augmentation and its image ops, models, devices,
checkpoints, model files and running the torch model."""

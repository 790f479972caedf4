"""Training: matcher, losses, checkpoints, loop, distributed helpers."""

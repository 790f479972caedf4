"""`detr-attn train` (moved here from detection.train.loop by the training redesign)."""
from detection.train.loop import add_arguments, run  # noqa: F401

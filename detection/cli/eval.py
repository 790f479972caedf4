"""`detr-attn eval` (moved here from detection.engine.evaluate by the eval redesign)."""
from detection.engine.evaluate import add_arguments, run  # noqa: F401

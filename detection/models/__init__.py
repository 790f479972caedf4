"""DETR-family models that can return their attention weights."""

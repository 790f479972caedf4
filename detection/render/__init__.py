"""Rendering: overlays, panels (OpenCV) and HTML/PDF reports. Never runs a model."""

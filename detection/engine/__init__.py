"""Engines: batch prediction, evaluation."""

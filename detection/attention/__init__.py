"""Attention -> saliency: maps in image coordinates, aggregation (heads, layers, rollout), metrics."""

"""Attention -> saliency: maps in image coordinates (dense or sampled attention), aggregation (heads, layers, rollout), metrics."""

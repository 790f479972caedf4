"""Data: the safe image loader, inference preprocessing, COCO datasets, augmentation, synthetic data."""

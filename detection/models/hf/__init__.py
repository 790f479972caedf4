"""Hugging Face transformers detectors (YOLOS, Conditional/DAB-DETR, Deformable DETR, RT-DETR v1/v2,
D-FINE, RF-DETR, Table Transformer) from their model folders, behind the detector contract."""

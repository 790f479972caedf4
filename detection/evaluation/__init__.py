"""COCO(-subset) evaluation of a model or of any detector's results file: pycocotools box AP
and attention faithfulness (`detr-attn eval`; the command line is in detection/cli/eval.py)."""

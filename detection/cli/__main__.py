"""`python -m detection.cli VERB ...` (what torchrun runs): the same as `detr-attn VERB ...`."""
import sys

from detection.cli import main

sys.exit(main())

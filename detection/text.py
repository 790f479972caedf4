"""Words of messages: counts with their noun in the right number ("1 image", "2 errors")."""
from __future__ import annotations


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """'1 image', '0 images', '2 detections'; `plural_form` where adding "s" is wrong."""
    return f"{count} {noun if count == 1 else (plural_form or noun + 's')}"

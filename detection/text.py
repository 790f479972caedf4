"""Words of messages: counts with their noun in the right number ("1 image", "2 errors"), sizes in bytes."""
from __future__ import annotations


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """'1 image', '0 images', '2 detections'; `plural_form` where adding "s" is wrong."""
    return f"{count} {noun if count == 1 else (plural_form or noun + 's')}"


def size(nbytes: int) -> str:
    """Bytes as people read them (binary units): '512 B', '812 KB', '2.4 MB', '106 MB', '1.2 GB'."""
    value, unit = float(nbytes), "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            break
        value /= 1024
    if unit == "B" or value >= 100:
        return f"{value:.0f} {unit}"
    return f"{value:.1f} {unit}"

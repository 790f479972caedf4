"""Input expansion for `detr-attn predict`: files, folders, globs, path lists and video frames
become a deterministic list of `SourceItem`s (one per image, sampled frame or failed input)."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from detection.data.images import IMAGE_EXTENSIONS

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv"})
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class SourceItem:
    """One unit of prediction output.

    key: unique stem within the run (file names under overlays/ and attention/).
    file: the path as expanded (str; relative paths stay relative to the working folder).
    image_id: 1-based position in the expanded list (stable for the same inputs).
    unit: index of the work unit (one still image, or one video with all its frames);
        units are what workers and ranks divide between them.
    frame_index: 0-based frame number in the video, None for still images.
    expected_size: (H, W) known before decoding (header / video properties), or None.
    error: set when the item cannot be processed at all (written to errors.jsonl).
    """

    key: str
    file: str
    image_id: int
    unit: int
    frame_index: int | None = None
    expected_size: tuple[int, int] | None = None
    error: str | None = None

    @property
    def is_video_frame(self) -> bool:
        return self.frame_index is not None


def is_video_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def _has_glob(text: str) -> bool:
    return any(ch in _GLOB_CHARS for ch in text)


def _glob_root(pattern: str) -> Path:
    """The folder before the first path component containing a wildcard."""
    parts = Path(pattern).parts
    root_parts: list[str] = []
    for part in parts:
        if _has_glob(part):
            break
        root_parts.append(part)
    return Path(*root_parts) if root_parts else Path(".")


def _stem_for(path: Path, root: Path) -> str:
    try:
        relative = path.relative_to(root)
    except ValueError:
        relative = Path(path.name)
    relative = relative.with_suffix("") if relative.suffix else relative
    return "__".join(part for part in relative.parts if part not in ("", "."))


def _wanted(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix in VIDEO_EXTENSIONS


def _walk_folder(folder: Path) -> list[Path]:
    """Image and video files under `folder`, recursively, sorted; hidden entries skipped."""
    found: list[Path] = []
    for current, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and _wanted(Path(name)):
                found.append(Path(current) / name)
    return found


@dataclass(frozen=True)
class _Entry:
    path: Path
    root: Path
    error: str | None = None


def _read_list_file(list_path: Path) -> tuple[list[tuple[str, Path]], str | None]:
    """(spec, base folder) per non-empty, non-comment line of a path list."""
    try:
        text = list_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return [], f"cannot read path list: {err}"
    specs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            specs.append((line, list_path.parent))
    return specs, None


def _expand_spec(spec: str, base: Path | None) -> list[_Entry]:
    """One command-line (or list-file) spec -> entries; never raises for a bad path."""
    text = spec
    path = Path(text)
    if base is not None and not path.is_absolute():
        path = base / path
        text = str(path)
    if _has_glob(text) and not path.exists():
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
        root = _glob_root(text)
        entries: list[_Entry] = []
        for match in matches:
            if match.is_dir():
                entries.extend(_Entry(p, root) for p in _walk_folder(match))
            elif _wanted(match):
                entries.append(_Entry(match, root))
        if not entries:
            return [_Entry(path, path.parent, error="glob pattern matched no image or video files")]
        return entries
    if path.is_dir():
        files = _walk_folder(path)
        if not files:
            return [_Entry(path, path.parent, error="folder contains no image or video files")]
        return [_Entry(p, path) for p in files]
    if path.exists():
        return [_Entry(path, path.parent)]
    return [_Entry(path, path.parent, error="file not found")]


def _video_frames(path: Path, stride: int) -> tuple[list[int], tuple[int, int] | None, str | None]:
    """Sampled frame numbers (0, k, 2k, ...), frame size (H, W) and an error, from the header.

    The frame count is the container's (CAP_PROP_FRAME_COUNT); frames it promises but the
    decoder cannot deliver are reported per frame at prediction time.
    """
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            return [], None, "cannot open video (unsupported codec or not a video)"
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    finally:
        capture.release()
    if count <= 0:
        return [], None, "video reports no frames"
    size = (height, width) if height > 0 and width > 0 else None
    return list(range(0, count, stride)), size, None


def expand_sources(
    specs: Sequence[str],
    list_files: Iterable[str | os.PathLike] = (),
    video_stride: int = 1,
) -> list[SourceItem]:
    """Expand inputs into SourceItems (deterministic order: inputs in order, folders sorted).

    specs: files, folders (recursive), glob patterns (`**` recursive), or `@list.txt`.
    list_files: extra path lists (same as `@` specs), expanded after `specs`.
    video_stride: keep every k-th frame of each video (frame 0, k, 2k, ...).

    The same file reached twice (e.g. by a folder and a glob) is kept once.

    Determinism matters: resume and multi-process sharding both recompute this list and rely
    on the same items, keys and image ids coming out for the same inputs.

    Keys: an item's `key` (its name in the run folder) is its path relative to its input root
    with '/' replaced by '__' and the extension dropped; for a file named directly the root is
    its folder, for a folder it is the folder, for a glob the folder before the first wildcard,
    for a list file the list's folder (entries are relative to it). Video frames append
    `__frame<NNNNNN>`. A key that would repeat gets `~2`, `~3`, ... in input order.
    """
    if video_stride < 1:
        raise ValueError(f"video_stride must be >= 1, got {video_stride}")
    queue: list[tuple[str, Path | None]] = [(s, None) for s in specs]
    queue += [("@" + str(f), None) for f in list_files]
    entries: list[_Entry] = []
    for spec, base in queue:
        if spec.startswith("@"):
            list_path = Path(spec[1:])
            if base is not None and not list_path.is_absolute():
                list_path = base / list_path
            lines, error = _read_list_file(list_path)
            if error:
                entries.append(_Entry(list_path, list_path.parent, error=error))
            for line, line_base in lines:
                if line.startswith("@"):
                    entries.append(_Entry(list_path, list_path.parent, error=f"nested path list {line!r} not supported"))
                    continue
                entries.extend(_expand_spec(line, line_base))
        else:
            entries.extend(_expand_spec(spec, base))

    items: list[SourceItem] = []
    seen_files: set[str] = set()
    used_keys: dict[str, int] = {}

    def unique(key: str) -> str:
        key = key or "image"
        count = used_keys.get(key, 0) + 1
        used_keys[key] = count
        return key if count == 1 else f"{key}~{count}"

    for unit, entry in enumerate(entries):
        identity = os.path.normcase(os.path.abspath(entry.path))
        if entry.error is None:
            if identity in seen_files:
                continue
            seen_files.add(identity)
        key = unique(_stem_for(entry.path, entry.root))
        if entry.error is not None:
            items.append(SourceItem(key, str(entry.path), 0, unit, error=entry.error))
        elif is_video_path(entry.path):
            frames, size, error = _video_frames(entry.path, video_stride)
            if error:
                items.append(SourceItem(key, str(entry.path), 0, unit, error=error))
            for frame in frames:
                items.append(SourceItem(f"{key}__frame{frame:06d}", str(entry.path), 0, unit,
                                        frame_index=frame, expected_size=size))
        else:
            items.append(SourceItem(key, str(entry.path), 0, unit))
    # units renumbered densely (skipped duplicates leave gaps), ids 1-based in list order
    dense = {u: i for i, u in enumerate(sorted({it.unit for it in items}))}
    return [replace(it, image_id=i + 1, unit=dense[it.unit]) for i, it in enumerate(items)]


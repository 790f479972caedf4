"""Object stores for `predict --engine ray`: inputs and the run folder at a URI that `pyarrow.fs`
understands (`s3://bucket/prefix`, with the usual AWS_* credential settings; an endpoint as the
URI's query, `?endpoint_override=HOST:PORT&scheme=http`, or AWS_ENDPOINT_URL).

The run folder's crash safety rests on POSIX files (atomic renames, journals appended with one
write + fsync), so each image's files are written by `write_image_files` into a local staging
folder of the model actor and then uploaded (a file appears in the bucket only complete); the
driver keeps the journals in a local staging folder, downloads the bucket's run.json and
predictions.jsonl there to resume, uploads the journal as it goes and the merged files at the end.
Images are downloaded by the decoding task to a temporary file and read by the one loader.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from detection.data.images import IMAGE_EXTENSIONS
from detection.data.sources import SourceItem
from detection.runfolder.layout import OWN_OUTPUTS, PREDICTIONS_FILE, RUN_FILE


def is_uri(text: str | os.PathLike) -> bool:
    """Whether a source or OUT names an object store (`scheme://...`) rather than a local path."""
    text = os.fspath(text)
    return "://" in text and not text.startswith("file://")


@dataclass(frozen=True)
class Location:
    """A folder in an object store: the pyarrow filesystem (picklable: it travels to the workers)
    and the folder's path in it ("bucket/prefix"); `uri` as the user wrote it (records name files
    as "s3://bucket/prefix/...", without the query)."""

    filesystem: Any
    path: str
    scheme: str

    @classmethod
    def parse(cls, uri: str) -> "Location":
        from pyarrow import fs

        try:
            filesystem, path = fs.FileSystem.from_uri(uri)
        except Exception as err:  # noqa: BLE001 - pyarrow's own message names the problem
            raise ValueError(f"{uri}: not a location pyarrow.fs can open ({err})") from err
        return cls(filesystem, path.rstrip("/"), uri.split("://", 1)[0])

    def name(self, path: str) -> str:
        """The URI of `path` (in this filesystem) as records name it."""
        return f"{self.scheme}://{path}"

    def child(self, relative: str) -> str:
        return f"{self.path}/{relative}"

    def read_bytes(self, relative: str) -> bytes | None:
        """The object's bytes, None when it does not exist."""
        from pyarrow import fs

        if self.filesystem.get_file_info(self.child(relative)).type != fs.FileType.File:
            return None
        with self.filesystem.open_input_stream(self.child(relative)) as stream:
            return stream.read()

    def upload(self, local: Path, relative: str) -> None:
        with open(local, "rb") as source, self.filesystem.open_output_stream(self.child(relative)) as target:
            shutil.copyfileobj(source, target, 1 << 20)

    def upload_tree(self, root: Path) -> None:
        """Every file under `root` to the same relative name here."""
        for path in sorted(root.rglob("*")):
            if path.is_file():
                self.upload(path, path.relative_to(root).as_posix())

    def clear(self) -> None:
        """Remove only what a predict run writes (`OWN_OUTPUTS`), as `RunFolder.clear`."""
        from pyarrow import fs

        for name in OWN_OUTPUTS:
            info = self.filesystem.get_file_info(self.child(name))
            if info.type == fs.FileType.Directory:
                self.filesystem.delete_dir(self.child(name))
            elif info.type == fs.FileType.File:
                self.filesystem.delete_file(self.child(name))


def expand_uri_sources(uris: Sequence[str]) -> tuple[list[SourceItem], Location]:
    """Image objects under each URI (a prefix, recursively, sorted; or one object) as SourceItems
    keyed as `data.sources` keys files (relative path, '/' -> '__', suffix dropped). All URIs must
    be in one object store. A URI naming nothing is an item with its error."""
    from pyarrow import fs

    items: list[SourceItem] = []
    location = None
    for uri in uris:
        here = Location.parse(uri)
        location = location or here
        if here.filesystem != location.filesystem:
            raise ValueError(f"{uri}: every URI source must be in one object store")
        info = here.filesystem.get_file_info(here.path)
        if info.type == fs.FileType.File:
            found = [(PurePosixPath(here.path).name, here.path)]
        elif info.type == fs.FileType.Directory:
            selector = fs.FileSelector(here.path, recursive=True)
            found = sorted((entry.path[len(here.path) + 1:], entry.path)
                           for entry in here.filesystem.get_file_info(selector) if entry.type == fs.FileType.File
                           and PurePosixPath(entry.path).suffix.lower() in IMAGE_EXTENSIONS)
        else:
            found = []
        if not found:
            items.append(SourceItem(key=PurePosixPath(here.path).stem or "input", file=uri, image_id=0, unit=0,
                                    error="no image found at this URI"))
        for relative, path in found:
            key = "__".join(PurePosixPath(relative).with_suffix("").parts)
            items.append(SourceItem(key=key, file=here.name(path), image_id=0, unit=0))
    seen: dict[str, int] = {}
    unique = []
    for index, item in enumerate(items):
        count = seen.get(item.key, 0)
        seen[item.key] = count + 1
        key = item.key if count == 0 else f"{item.key}_{count}"
        unique.append(replace(item, key=key, image_id=index + 1, unit=index))
    assert location is not None
    return unique, location


def localized(items: Sequence[SourceItem], location: Location, folder: Path) -> list[SourceItem]:
    """The items with each object downloaded into `folder` (file = the local copy); an object that
    cannot be read keeps its URI (the loader then reports the file as missing)."""
    local = []
    folder.mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(items):
        path = item.file.split("://", 1)[1]
        target = folder / f"{index}{PurePosixPath(path).suffix}"
        try:
            with location.filesystem.open_input_stream(path) as stream, open(target, "wb") as out:
                shutil.copyfileobj(stream, out, 1 << 20)
        except (OSError, ValueError):
            local.append(item)
            continue
        local.append(replace(item, file=str(target)))
    return local


class StagedOutput:
    """The driver's side of a run folder in an object store: a local staging folder holding the
    journals (with the bucket's run.json and predictions.jsonl downloaded, to resume), uploaded
    with `sync` as the run goes and at its end."""

    def __init__(self, location: Location) -> None:
        self.location = location
        self.folder = Path(tempfile.mkdtemp(prefix="detection-ray-out-"))
        for name in (RUN_FILE, PREDICTIONS_FILE):
            data = location.read_bytes(name)
            if data is not None:
                (self.folder / name).write_bytes(data)

    def sync(self, names: Sequence[str]) -> None:
        for name in names:
            if (self.folder / name).is_file():
                self.location.upload(self.folder / name, name)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

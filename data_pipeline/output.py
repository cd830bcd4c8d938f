"""The data job's output directory on any pyarrow filesystem: a local path or a URI (``s3://bucket/run``,
``gs://...``, ``hdfs://...``, ``file:///...``).

Every file the job writes goes through ``Output``, in one way on every filesystem: written under a temp
name next to its final name, then moved (``FileSystem.move``). A reader therefore never sees a half-written
file: on a local disk the move is a rename; on an object store the copy behind the move creates the final
object whole or not at all, and a temp object left by a crash is ignored and replaced by the rerun. Ray
Data's own writes (whole directories) end with a ``_SUCCESS`` marker instead, since moving a directory of
objects is not atomic. The driver and the workers each build an ``Output`` from the same location string.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from aquila_ray.data.shards import atomic_output, join_location, resolve_location

PART_PREFIX = "part-"


class Output:
    """``location``: a local path (made absolute) or a URI. ``uri(rel)`` is what Ray Data and pyarrow
    readers take; ``path(rel)`` is the path inside ``fs``."""

    def __init__(self, location: str | Path) -> None:
        text = str(location)
        self.location = text.rstrip("/") if "://" in text else os.path.abspath(os.path.expanduser(text))
        self.fs, self.root = resolve_location(self.location)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __str__(self) -> str:
        return self.location

    def uri(self, rel: str = "") -> str:
        return str(join_location(self.location, rel)) if rel else self.location

    def path(self, rel: str = "") -> str:
        return str(join_location(self.root, rel)) if rel else self.root

    def _type(self, rel: str) -> pafs.FileType:
        return self.fs.get_file_info(self.path(rel)).type

    def is_file(self, rel: str) -> bool:
        return self._type(rel) == pafs.FileType.File

    def is_dir(self, rel: str) -> bool:
        """A directory (on an object store: a prefix with at least one object under it)."""
        return self._type(rel) == pafs.FileType.Directory

    def parts(self, rel: str, suffix: str = ".parquet") -> list[tuple[int, str]]:
        """Sorted (index, rel path) of the ``part-XXXXX<suffix>`` files directly under ``rel``."""
        if not self.is_dir(rel):
            return []
        out = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True)):
            name = info.base_name
            if info.type == pafs.FileType.File and name.startswith(PART_PREFIX) and name.endswith(suffix):
                index = name[len(PART_PREFIX):-len(suffix)]
                if index.isdigit():
                    out.append((int(index), f"{rel}/{name}"))
        return sorted(out)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def open(self, rel: str) -> AbstractContextManager[pa.NativeFile]:
        """A stream whose bytes appear at ``rel`` only when the block ends without an error."""
        return atomic_output(self.path(rel), self.fs)

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open(rel) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def remove(self, rel: str) -> None:
        """Delete a file or a directory tree under ``rel``, if there is one."""
        kind = self._type(rel)
        if kind == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))
        elif kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))

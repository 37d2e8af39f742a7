"""Where inputs and outputs live: a local path, or a URI that pyarrow's filesystems resolve (``s3://``, ``gs://``,
``hdfs://``, ...), behind one small interface.

A ``Location`` is picklable (Ray ships it to the read tasks, the generate stages and the id shards) and prints as
the user wrote it (a URI) or as an absolute path. Credentials and endpoints come from the filesystem's usual
configuration (for S3: ``AWS_*`` variables, ``~/.aws``, instance roles).

Local files are written under a temporary name and renamed, so a reader never sees half a file. Object stores have
no rename, but an object appears only once its upload completes: there a file is written under its final name.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

Where = Union[str, Path, "Location"]

URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")  # s3://, gs://, hdfs://, file:// (a one-letter scheme is a drive)


def is_uri(text: str) -> bool:
    return bool(URI.match(text))


@dataclass(frozen=True)
class Location:
    """A file or directory on a pyarrow filesystem. ``text``: how to show it (the URI, or the absolute path)."""

    fs: object  # pyarrow.fs.FileSystem
    path: str
    text: str

    # -- construction

    @classmethod
    def of(cls, where: Where) -> "Location":
        """A Location from a local path or a URI (a Location is returned as it is)."""
        if isinstance(where, Location):
            return where
        import pyarrow.fs as pafs

        text = str(where)
        if not is_uri(text):
            return cls(pafs.LocalFileSystem(), str(Path(text).expanduser().resolve()), text)
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except Exception as e:  # ArrowInvalid, or OSError for a scheme pyarrow was built without
            raise ValueError(f"{text}: not a location pyarrow can open ({e}); give a local path or an s3://, gs:// "
                             f"or hdfs:// URI") from e
        return cls(fs, path.rstrip("/"), text.rstrip("/"))

    def child(self, name: str) -> "Location":
        return Location(self.fs, f"{self.path}/{name}", f"{self.text}/{name}")

    @property
    def parent(self) -> "Location":
        return Location(self.fs, self.path.rsplit("/", 1)[0], self.text.rsplit("/", 1)[0] if "/" in self.text else ".")

    # -- what it is

    @property
    def local(self) -> bool:
        import pyarrow.fs as pafs

        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rfind("."):] if "." in name else ""

    def relative_to(self, root: "Location") -> str:
        assert self.path.startswith(root.path + "/"), (self.path, root.path)
        return self.path[len(root.path) + 1:]

    def within(self, other: "Location") -> bool:
        """This location is ``other`` or lies under it (on the same filesystem)."""
        return type(self.fs) is type(other.fs) and (self.path == other.path or self.path.startswith(other.path + "/"))

    def __str__(self) -> str:
        return self.text

    @property
    def key(self) -> str:
        """The same for every way of naming this location: the absolute path, or the URI."""
        return self.path if self.local else self.text

    def _info(self):
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def size(self) -> int:
        return self._info().size or 0

    def files(self, recursive: bool = False) -> list["Location"]:
        """The files under this directory, sorted (none if it is not a directory)."""
        import pyarrow.fs as pafs

        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True))
        return sorted((Location(self.fs, i.path, f"{self.text}/{i.path[len(self.path) + 1:]}")
                       for i in infos if i.type == pafs.FileType.File), key=lambda loc: loc.path)

    def entries(self) -> int:
        """How many files and directories this directory holds directly (0 if it is not a directory)."""
        import pyarrow.fs as pafs

        if not self.is_dir():
            return 0
        return len(self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True)))

    # -- reading and writing

    def open(self):
        """A seekable binary file to read (Parquet needs seeking)."""
        return self.fs.open_input_file(self.path)

    def open_stream(self) -> io.BufferedReader:
        """A buffered binary stream to read from the start (iterates by lines)."""
        return io.BufferedReader(self.fs.open_input_stream(self.path))

    def read_text(self) -> str:
        with self.fs.open_input_stream(self.path) as f:
            return f.read().decode()

    def make_dir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def write_bytes(self, data) -> None:
        """Write a whole file so that no reader sees part of it (see the module docstring)."""
        target = self.path
        if self.local:
            parent, name = self.path.rsplit("/", 1)
            target = f"{parent}/.{name}.tmp"
        with self.fs.open_output_stream(target) as f:
            f.write(data)
        if target != self.path:
            self.fs.move(target, self.path)

    def delete(self) -> None:
        self.fs.delete_file(self.path)

"""File I/O primitives shared by checkpoints (rtrain.checkpoint) and dataset preparation (data_prep).

Durable means flushed and fsynced before the call returns, so a crash after it cannot lose the bytes;
atomic means written beside the target and renamed over it, so a reader sees the old file or the whole
new one, never half. Digests are computed while bytes stream out (HashingWriter), so large files are
never read back just to hash them. Standard library only: every layer of rtrain may import this.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


class HashingWriter:
    """Write-only file wrapper that sha256-hashes and counts the bytes passing through it.

    Hand it to a streaming writer (torch.save, a tar writer) in place of the file: the digest is ready
    when writing ends, without reading the file back.
    """

    def __init__(self, target: BinaryIO) -> None:
        self.target = target
        self.size = 0
        self._hash = hashlib.sha256()

    def write(self, data) -> int:
        self._hash.update(data)
        self.size += memoryview(data).nbytes  # not len(): a memoryview of wider items counts items
        return self.target.write(data)

    def flush(self) -> None:
        self.target.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@contextmanager
def durable_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open `path` for writing in binary; on a clean exit its bytes are flushed and fsynced."""
    with open(path, "wb") as file:
        yield file
        file.flush()
        os.fsync(file.fileno())


def default_temp_name(path: Path) -> str:
    """A hidden, unique name beside `path` (several writers may race for one target)."""
    return f".{path.name}.{uuid.uuid4().hex}.partial"


@contextmanager
def atomic_file(path: str | os.PathLike, temp_name: str | None = None) -> Iterator[BinaryIO]:
    """Write through a durable temp file beside `path`, renamed over `path` on a clean exit.

    `temp_name` (a file name, in the same directory so the rename stays atomic) lets a caller give its
    temp files a pattern its own cleanup recognises; by default a unique hidden `.partial` name. The temp
    file is removed if writing fails.
    """
    path = Path(path)
    temp = path.with_name(temp_name if temp_name is not None else default_temp_name(path))
    try:
        with durable_file(temp) as file:
            yield file
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_durably(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` in place, flushed and fsynced."""
    with durable_file(path) as file:
        file.write(data.encode() if isinstance(data, str) else data)


def write_atomically(path: str | os.PathLike, data: bytes | str, temp_name: str | None = None) -> None:
    """Write `data` (text as UTF-8) to `path` through a temp file: see atomic_file."""
    with atomic_file(path, temp_name) as file:
        file.write(data.encode() if isinstance(data, str) else data)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (files created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""A node-local cache of remote shards (data.cache_dir, data.cache_max_gb): each shard is fetched from its
store once per node, not once per epoch.

A cached shard is named by the sha256 its manifest gives (`<cache_dir>/<sha256>.tar`), written only through a
temporary file that is hashed while it is written and renamed into place once it matches, and hashed again
every time it is used: a file changed on disk (or planted there) is never read as a shard, it is fetched
again. Ranks and loader worker processes of one node share the cache: a lock file per shard lets one of them
download while the others wait and then use its copy; a file that is evicted or replaced while another
process reads it stays readable through that process's open descriptor. Past the size bound the least
recently used shards are removed (a shard larger than the whole bound is read from its store, uncached).
A shard without a sha256 in its manifest cannot be verified and is never cached.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import stat
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from rtrain.data.stores import ShardError, one_line

log = logging.getLogger("rtrain.data.cache")

_DIGEST = re.compile(r"[0-9a-f]{64}")
_BLOCK = 1 << 20
GiB = 1 << 30


class ShardCache:
    """Picklable (a path and a number): the loader's worker processes each build their view of it."""

    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)

    @classmethod
    def from_config(cls, data: Any) -> ShardCache | None:
        root = getattr(data, "cache_dir", None)
        return cls(root, int(getattr(data, "cache_max_gb", 100.0) * GiB)) if root else None

    def usable_for(self, entry: Any) -> bool:
        return isinstance(entry.sha256, str) and bool(_DIGEST.fullmatch(entry.sha256)) and \
            0 <= entry.bytes <= self.max_bytes

    def path_of(self, entry: Any) -> Path:
        return self.root / f"{entry.sha256}.tar"

    @contextmanager
    def open(self, entry: Any, where: str, fetch: Callable[[], Any]) -> Iterator[BinaryIO]:
        """The shard `entry` (stored at `where`) as a local, verified, seekable file. `fetch()` opens the
        store's stream (a context manager) when the cache does not hold a good copy."""
        self._make_root()
        path = self.path_of(entry)
        with self._locked(entry):
            handle = self._verified_copy(path, entry)
            if handle is None:
                self._download(path, entry, where, fetch)
                self._evict(keep=path)
                handle = open(path, "rb")
        with handle:
            yield handle

    # ------------------------------------------------------------------------------------------------------

    def _make_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ShardError(f"data.cache_dir {self.root}: cannot create it ({exc.strerror or exc})") from exc
        if not self.root.is_dir():
            raise ShardError(f"data.cache_dir {self.root}: not a folder")

    @contextmanager
    def _locked(self, entry: Any) -> Iterator[None]:
        """One process of the node at a time per shard (the lock goes with the process, however it ends)."""
        fd = os.open(self.root / f".{entry.sha256}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _verified_copy(self, path: Path, entry: Any) -> BinaryIO | None:
        """The cached copy, opened and hashed through one descriptor (eviction cannot swap it); None when
        there is none or it no longer matches (then it is removed and fetched again)."""
        try:  # never blocks on a FIFO planted under the name: non-blocking open, then a regular file only
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            log.warning("cache entry %s is not a regular file: not used, %s read from its store", path, entry.name)
            raise ShardError(f"data.cache_dir {self.root}: {path.name} is not a regular file (remove it)")
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
        try:
            digest, size = hashlib.sha256(), 0
            while block := handle.read(_BLOCK):
                size += len(block)
                if size > entry.bytes:
                    break
                digest.update(block)
            if size == entry.bytes and digest.hexdigest() == entry.sha256:
                handle.seek(0)
                _touch(handle)
                return handle
        except OSError:
            pass
        handle.close()
        log.warning("cached shard %s (for %s) does not match its manifest's sha256 and size: fetching it again",
                    path, entry.name)
        path.unlink(missing_ok=True)
        return None

    def _download(self, path: Path, entry: Any, where: str, fetch: Callable[[], Any]) -> None:
        temp = self.root / f".tmp-{entry.sha256}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        digest, size = hashlib.sha256(), 0
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out, fetch() as stream:
                while block := _read(stream, where):
                    size += len(block)
                    if size > entry.bytes:  # never more on disk than the manifest promised
                        raise ShardError(f"shard {where}: longer than the {entry.bytes} bytes the manifest says")
                    digest.update(block)
                    out.write(block)
            if size != entry.bytes or digest.hexdigest() != entry.sha256:
                raise ShardError(f"shard {where}: sha256 does not match the manifest ({size} bytes read, "
                                 f"{entry.bytes} expected)")
            os.replace(temp, path)
        except OSError as exc:
            raise ShardError(f"shard {where}: cannot write it to data.cache_dir {self.root} "
                             f"({exc.strerror or exc})") from exc
        finally:
            temp.unlink(missing_ok=True)
        log.debug("cached %s as %s (%d bytes)", where, path, size)

    def _evict(self, keep: Path) -> None:
        """Least recently used shards out until the cache fits its bound (one evicting process at a time)."""
        fd = os.open(self.root / ".evict.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            cached = []
            for item in os.scandir(self.root):
                if item.name.endswith(".tar") and _DIGEST.fullmatch(item.name[:-4]) and \
                        item.is_file(follow_symlinks=False):
                    stat = item.stat(follow_symlinks=False)
                    cached.append((stat.st_mtime_ns, stat.st_size, Path(item.path)))
            total = sum(size for _, size, _ in cached)
            for _, size, path in sorted(cached):
                if total <= self.max_bytes:
                    break
                if path != keep:
                    path.unlink(missing_ok=True)
                    total -= size
        finally:
            os.close(fd)


def _read(stream: BinaryIO, where: str) -> bytes:
    """A block from the store; its failures are the store's, not the cache folder's."""
    try:
        return stream.read(_BLOCK)
    except Exception as exc:  # noqa: BLE001 - network stacks raise many types
        raise ShardError(f"shard {where}: cannot read ({one_line(exc)})") from exc


def _touch(handle: BinaryIO) -> None:
    """Recently used: evicted last (a copy another user wrote stays usable, only its age is not renewed)."""
    try:
        os.utime(handle.fileno())
    except OSError:
        pass

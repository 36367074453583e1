"""A node-local cache of remote shards (data.cache_dir, data.cache_max_gb): each shard is fetched from its
store once per node, not once per epoch.

A cached shard is named by the sha256 its manifest gives (`<cache_dir>/<sha256>.tar`, lower case), written
only through a temporary file that is hashed while it is written and renamed into place once it matches, and
hashed again every time it is used: a file changed on disk (or planted there) is never read as a shard, it is
fetched again. A reader is handed the descriptor it verified (the temporary file's after the rename, the
cached file's after hashing it), never the file opened again by name, so another process that evicts or
replaces the file cannot make a verified read fail or read other bytes. Ranks and loader worker processes of
one node share the cache: a lock file per shard lets one of them download while the others wait and then use
its copy; the wait ends once that download has not progressed for `lock_wait_s` (a process stuck on a dead
store must not stop the others). Past the size bound the least recently used shards are removed (a shard
larger than the whole bound is read from its store, uncached), and so are temporary files left by killed
downloads.

The cache folder failing (cannot be made, not writable, read-only, full even after evicting, failing disk,
owned by another user who can write it) is the node's problem, not the shard's: `open` then yields None and
the caller reads the shard from its store, uncached, with one warning. A shard without a sha256 in its
manifest cannot be verified and is never cached.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any, BinaryIO

from rtrain.data.stores import ShardError, one_line

log = logging.getLogger("rtrain.data.cache")

_DIGEST = re.compile(r"[0-9a-f]{64}")
_TEMP = re.compile(r"\.tmp-([0-9a-f]{64})-")
_BLOCK = 1 << 20
_FULL = (errno.ENOSPC, errno.EDQUOT)
GiB = 1 << 30
LOCK_WAIT_S = 300.0  # a download without progress for this long is given up by its waiters (stores retry ~3 min)
STALE_TEMP_S = 300.0  # a temp file unchanged this long, its shard's lock free, was left by a killed download


class _Uncached(Exception):
    """The cache folder cannot serve this shard (its own failure, not the shard's): read it from its store.
    `kind` keys the one warning given per kind of failure."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class ShardCache:
    """Picklable (a path and numbers): the loader's worker processes each build their view of it."""

    def __init__(self, root: str | os.PathLike, max_bytes: int, lock_wait_s: float = LOCK_WAIT_S):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.lock_wait_s = float(lock_wait_s)
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, data: Any) -> ShardCache | None:
        root = getattr(data, "cache_dir", None)
        return cls(root, int(getattr(data, "cache_max_gb", 100.0) * GiB)) if root else None

    def usable_for(self, entry: Any) -> bool:
        return isinstance(entry.sha256, str) and bool(_DIGEST.fullmatch(entry.sha256.lower())) and \
            0 <= entry.bytes <= self.max_bytes

    def path_of(self, entry: Any) -> Path:
        return self.root / f"{entry.sha256.lower()}.tar"

    @contextmanager
    def open(self, entry: Any, where: str, fetch: Callable[[], Any]) -> Iterator[BinaryIO | None]:
        """The shard `entry` (stored at `where`) as a local, verified, seekable file, or None when the cache
        folder cannot serve it (see the module docstring: the caller reads it from its store). `fetch()` opens
        the store's stream (a context manager) when the cache does not hold a good copy; the store's failures
        and a copy that does not match the manifest raise ShardError."""
        try:
            handle = self._open(entry, where, fetch)
        except _Uncached as reason:
            first = reason.kind not in self._warned
            self._warned.add(reason.kind)
            log.log(logging.WARNING if first else logging.DEBUG, "%s: shard %s read from its store, uncached",
                    reason, where)
            handle = None
        with handle if handle is not None else nullcontext():
            yield handle

    # ------------------------------------------------------------------------------------------------------

    def _open(self, entry: Any, where: str, fetch: Callable[[], Any]) -> BinaryIO:
        self._check_root()
        path, sha = self.path_of(entry), entry.sha256.lower()
        try:
            with self._locked(sha, where):
                handle = self._verified_copy(path, entry, sha)
                if handle is None:
                    handle = self._download(path, entry, sha, where, fetch)
                    self._evict(keep=path)
                return handle
        except OSError as exc:
            if exc.errno in _FULL:
                raise _Uncached("full", f"data.cache_dir {self.root}: full ({exc.strerror}; a write that fails so "
                                        "is retried once after evicting)") from exc
            raise _Uncached("folder", f"data.cache_dir {self.root}: cannot use it ({_reason(exc)})") from exc

    def _check_root(self) -> None:
        """The folder, made 0o700 when missing. One another user may write is not used: they could remove, hold
        or plant files there (copies stay verified, but reads could be held back); a folder of this user is
        used whatever its mode (sharing it is this user's choice), so is root's unless others may write it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            info = os.stat(self.root)
        except OSError as exc:
            raise _Uncached("root", f"data.cache_dir {self.root}: cannot create it ({_reason(exc)})") from exc
        if not stat.S_ISDIR(info.st_mode):
            raise _Uncached("root", f"data.cache_dir {self.root}: not a folder")
        if info.st_uid != os.geteuid() and (info.st_uid != 0 or info.st_mode & 0o022):
            raise _Uncached("root", f"data.cache_dir {self.root}: owned by uid {info.st_uid} (mode "
                                    f"{stat.S_IMODE(info.st_mode):o}), others may write it: not used; give a "
                                    "folder of your own (a missing one is created private)")

    @contextmanager
    def _locked(self, sha: str, where: str) -> Iterator[None]:
        """One process of the node at a time per shard (the lock goes with the process, however it ends). A
        waiter gives up once the holder's download (its temp file) has not grown for lock_wait_s."""
        lock = self.root / f".{sha}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            progress, pause = time.time(), 0.005
            while not _try_lock(fd):
                if time.time() - progress > self.lock_wait_s:
                    progress = max([progress, *(_mtime(p) for p in self.root.glob(f".tmp-{sha}-*"))])
                    if time.time() - progress > self.lock_wait_s:
                        raise _Uncached(f"lock {sha}", f"data.cache_dir {self.root}: {lock.name} held by another "
                                                       f"process whose download of shard {where} has not "
                                                       f"progressed for {self.lock_wait_s:g} s")
                time.sleep(pause)
                pause = min(2 * pause, 0.1)
            yield
        finally:
            os.close(fd)

    def _verified_copy(self, path: Path, entry: Any, sha: str) -> BinaryIO | None:
        """The cached copy, opened and hashed through one descriptor (eviction cannot swap it); None when
        there is none or it no longer matches (then it is removed and fetched again). Failing to read it is
        the disk's problem (OSError), not a mismatch."""
        try:  # never blocks on a FIFO planted under the name: non-blocking open, then a regular file only
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP):  # a symlink planted there is replaced by the download
                return None
            raise
        handle = os.fdopen(fd, "rb")
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _Uncached("irregular", f"data.cache_dir {self.root}: {path.name} is not a regular file "
                                             "(remove it)")
            os.set_blocking(fd, True)
            if info.st_size == entry.bytes and _sha256_of(handle, entry.bytes) == sha:
                handle.seek(0)
                _touch(handle)
                return handle
        except BaseException:
            handle.close()
            raise
        handle.close()
        log.warning("cached shard %s (for %s) does not match its manifest's sha256 and size: fetching it again",
                    path, entry.name)
        path.unlink(missing_ok=True)
        return None

    def _download(self, path: Path, entry: Any, sha: str, where: str, fetch: Callable[[], Any]) -> BinaryIO:
        """The shard from its store into a temp file, verified, renamed to `path`; returned open (at 0)."""
        temp = self.root / f".tmp-{sha}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        handle = os.fdopen(fd, "rb")
        digest, size, evicted = hashlib.sha256(), 0, False
        try:
            with fetch() as stream:
                while block := _read(stream, where):
                    if size + len(block) > entry.bytes:  # never more on disk than the manifest promised
                        raise ShardError(f"shard {where}: longer than the {entry.bytes} bytes the manifest says")
                    digest.update(block)
                    evicted = self._write(fd, block, entry.bytes - size, evicted)
                    size += len(block)
            if size != entry.bytes or digest.hexdigest() != sha:
                raise ShardError(f"shard {where}: sha256 does not match the manifest ({size} bytes read, "
                                 f"{entry.bytes} expected)")
            os.replace(temp, path)
        except BaseException:
            handle.close()
            with suppress(OSError):
                temp.unlink()
            raise
        log.debug("cached %s as %s (%d bytes)", where, path, size)
        handle.seek(0)
        return handle

    def _write(self, fd: int, block: bytes, need: int, evicted: bool) -> bool:
        """All of `block` to the temp file. The disk full (the bound larger than it, or others filling it): the
        least recently used shards out to make room for the rest of this one, then the write again, once per
        download; True once that was done."""
        view = memoryview(block)
        while view:
            try:
                view = view[os.write(fd, view):]
            except OSError as exc:
                if evicted or exc.errno not in _FULL:
                    raise
                evicted = True
                self._evict(keep=None, need=need)
        return evicted

    def _evict(self, keep: Path | None, need: int = 0) -> None:
        """Least recently used shards out until the cache fits its bound and, for a full disk, `need` bytes are
        freed; stale temp files out (one evicting process at a time). What cannot be removed stays: eviction
        fails no read."""
        try:
            fd = os.open(self.root / ".evict.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            log.debug("data.cache_dir %s: cannot evict (%s)", self.root, _reason(exc))
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            cached = []
            for item in os.scandir(self.root):
                with suppress(OSError):  # removed meanwhile, or not ours to remove
                    if temp := _TEMP.match(item.name):
                        self._remove_if_stale(item, temp.group(1))
                    elif item.name.endswith(".tar") and _DIGEST.fullmatch(item.name[:-4]) and \
                            item.is_file(follow_symlinks=False):
                        info = item.stat(follow_symlinks=False)
                        cached.append((info.st_mtime_ns, info.st_size, Path(item.path)))
            total = sum(size for _, size, _ in cached)
            limit = min(self.max_bytes, total - need)
            for _, size, path in sorted(cached):
                if total <= limit:
                    break
                if path != keep:
                    with suppress(OSError):
                        path.unlink(missing_ok=True)
                        total -= size
        except OSError as exc:
            log.debug("data.cache_dir %s: cannot evict (%s)", self.root, _reason(exc))
        finally:
            os.close(fd)

    def _remove_if_stale(self, item: os.DirEntry, sha: str) -> None:
        """A temp file of a killed download: unchanged for STALE_TEMP_S and its shard's lock free (a download
        under way holds it, however slow, this process's own included)."""
        if time.time() - item.stat(follow_symlinks=False).st_mtime < STALE_TEMP_S:
            return
        fd = os.open(self.root / f".{sha}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            if _try_lock(fd):
                os.unlink(item.path)
                log.debug("data.cache_dir %s: removed %s, left by a killed download", self.root, item.name)
        finally:
            os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _sha256_of(handle: BinaryIO, limit: int) -> str | None:
    """The hex digest of what `handle` holds; None when it holds more than `limit` bytes (grown meanwhile)."""
    digest, size = hashlib.sha256(), 0
    while block := handle.read(_BLOCK):
        size += len(block)
        if size > limit:
            return None
        digest.update(block)
    return digest.hexdigest()


def _read(stream: BinaryIO, where: str) -> bytes:
    """A block from the store; its failures are the store's, not the cache folder's."""
    try:
        return stream.read(_BLOCK)
    except Exception as exc:  # noqa: BLE001 - network stacks raise many types
        raise ShardError(f"shard {where}: cannot read ({one_line(exc)})") from exc


def _reason(exc: OSError) -> str:
    name = f": {os.path.basename(exc.filename)}" if isinstance(exc.filename, str) else ""
    return f"{exc.strerror or one_line(exc)}{name}"


def _touch(handle: BinaryIO) -> None:
    """Recently used: evicted last (a copy another user wrote stays usable, only its age is not renewed)."""
    try:
        os.utime(handle.fileno())
    except OSError:
        pass

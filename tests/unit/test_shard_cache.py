"""rtrain.data.cache.ShardCache: content-addressed, verified on write and on use, one download per shard among
processes sharing it, least recently used out past the bound; what it refuses to cache is read uncached."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import logging
import multiprocessing
import os
import signal
import tarfile
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

import rtrain.data.sources as sources
from rtrain.data.cache import ShardCache
from rtrain.data.format import ShardEntry
from rtrain.data.stores import ShardError


def _entry(name: str, body: bytes, sha: str | None = None) -> SimpleNamespace:
    digest = sha if sha is not None else hashlib.sha256(body).hexdigest()
    return SimpleNamespace(name=name, bytes=len(body), sha256=digest)


class Trickle(io.BytesIO):
    """A store's stream serving `chunk` bytes per read, `pause_s` apart (a slow download); sets `started` first."""

    def __init__(self, body: bytes, chunk: int, pause_s: float, started=None):
        super().__init__(body)
        self.chunk, self.pause_s, self.started = chunk, pause_s, started

    def read(self, size: int | None = -1) -> bytes:
        if self.started is not None:
            self.started.set()
        time.sleep(self.pause_s)
        return super().read(self.chunk if size is None or size < 0 else min(size, self.chunk))


class Store:
    """A store that counts what it serves (the cache's fetch callable)."""

    def __init__(self, body: bytes, delay_s: float = 0.0, trickle: tuple = ()):
        self.body, self.delay_s, self.trickle, self.fetches = body, delay_s, trickle, 0

    def fetch(self):
        @contextmanager
        def stream():
            self.fetches += 1
            time.sleep(self.delay_s)
            yield Trickle(self.body, *self.trickle) if self.trickle else io.BytesIO(self.body)
        return stream()


def _read(cache: ShardCache, entry, store: Store) -> bytes:
    with cache.open(entry, f"s3://b/{entry.name}", store.fetch) as handle:
        return handle.read()


def _uncached(cache: ShardCache, entry, store: Store) -> bool:
    """True when the cache declines to serve `entry` (its caller then reads the shard from its store)."""
    with cache.open(entry, f"s3://b/{entry.name}", store.fetch) as handle:
        return handle is None


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "rtrain.data.cache" and r.levelno >= logging.WARNING]


def _tar(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _source(monkeypatch, shards: dict[str, bytes], cache: ShardCache | None) -> sources.ShardSource:
    """A ShardSource over an object store holding `shards` (name -> bytes)."""
    @contextmanager
    def open_stream(where, storage_options=None):
        yield io.BytesIO(shards[where.rsplit("/", 1)[1]])
    monkeypatch.setattr(sources, "open_stream", open_stream)
    return sources.ShardSource("s3://bucket/data", "train", cache=cache)


def _shard_entry(name: str, body: bytes, sha: str | None = None) -> ShardEntry:
    return ShardEntry(name=name, count=1, bytes=len(body), sha256=sha or hashlib.sha256(body).hexdigest())


def test_fetched_once_then_served_verified_and_refetched_when_damaged(tmp_path, caplog):
    body = os.urandom(3000)
    entry, store = _entry("train-0.tar", body), Store(body)
    cache = ShardCache(tmp_path / "cache", max_bytes=1 << 20)
    assert _read(cache, entry, store) == body and store.fetches == 1
    assert _read(cache, entry, store) == body and store.fetches == 1  # the second epoch: from the cache
    path = cache.path_of(entry)
    assert path.name == f"{entry.sha256}.tar" and oct(path.parent.stat().st_mode & 0o777) == "0o700"
    damaged = bytearray(path.read_bytes())
    damaged[1234] ^= 0xFF
    path.write_bytes(bytes(damaged))  # a flipped byte on the node's disk
    assert _read(cache, entry, store) == body and store.fetches == 2
    assert "does not match its manifest's sha256" in caplog.text
    path.write_bytes(body + b"more")  # longer
    assert _read(cache, entry, store) == body and store.fetches == 3


def test_a_store_that_lies_is_refused_and_nothing_is_kept(tmp_path):
    body = os.urandom(2000)
    cache = ShardCache(tmp_path / "cache", max_bytes=1 << 20)
    for served in (body[:-1] + b"x", body + b"extra", body[:100]):
        with pytest.raises(ShardError, match=r"^shard s3://b/t.tar: (sha256 does not match|longer than)"):
            _read(cache, _entry("t.tar", body), Store(served))
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == []
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_least_recently_used_out_past_the_bound(tmp_path):
    bodies = [os.urandom(1000) for _ in range(4)]
    entries = [_entry(f"s{i}.tar", b) for i, b in enumerate(bodies)]
    cache = ShardCache(tmp_path / "cache", max_bytes=2500)  # room for two
    for entry, body in zip(entries[:2], bodies):
        _read(cache, entry, Store(body))
        time.sleep(0.01)
    _read(cache, entries[0], Store(bodies[0]))  # used again: now the most recent
    time.sleep(0.01)
    _read(cache, entries[2], Store(bodies[2]))
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.tar")) == sorted(
        cache.path_of(e).name for e in (entries[0], entries[2]))


def test_what_cannot_be_cached_says_so(tmp_path):
    cache = ShardCache(tmp_path / "cache", max_bytes=1000)
    assert not cache.usable_for(_entry("big.tar", b"x" * 1001))  # larger than the whole bound
    assert not cache.usable_for(_entry("nosum.tar", b"abc", sha=""))  # no digest: cannot be verified
    assert not cache.usable_for(_entry("odd.tar", b"abc", sha="../../etc/passwd"))
    assert cache.usable_for(_entry("ok.tar", b"abc"))
    assert ShardCache.from_config(SimpleNamespace(cache_dir=None)) is None


def _reader(root: str, body: bytes, start, results) -> None:
    store = Store(body, delay_s=0.3)
    start.wait()
    got = _read(ShardCache(root, 1 << 20), _entry("shared.tar", body), store)
    results.put((got == body, store.fetches))


def test_processes_sharing_the_cache_download_each_shard_once(tmp_path):
    body = os.urandom(5000)
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    procs = [context.Process(target=_reader, args=(str(tmp_path / "cache"), body, start, results)) for _ in range(4)]
    for proc in procs:
        proc.start()
    start.set()
    outcomes = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    assert all(same for same, _ in outcomes)
    assert sum(fetches for _, fetches in outcomes) == 1  # one downloaded; three waited and used its copy


def test_a_fifo_planted_under_a_shards_name_is_refused_not_waited_on(tmp_path, caplog):
    body = os.urandom(100)
    entry, store = _entry("f.tar", body), Store(body)
    cache = ShardCache(tmp_path / "cache", max_bytes=1 << 20)
    cache.root.mkdir(mode=0o700)
    os.mkfifo(cache.path_of(entry))
    assert _uncached(cache, entry, store) and store.fetches == 0  # read from its store by the caller
    assert any(f"{entry.sha256}.tar is not a regular file (remove it)" in w for w in _warnings(caplog))


def _reader_of_its_own_shards(root: str, k: int, count: int, size: int, start, results) -> None:
    cache, failures = ShardCache(root, int(size * 1.5)), []  # room for one: every download evicts another's
    start.wait()
    for i in range(count):
        body = bytes([k, i]) * (size // 2)
        try:
            if _read(cache, _entry(f"s{k}-{i}.tar", body), Store(body, trickle=(1 << 20, 0.0))) != body:
                failures.append(f"s{k}-{i}.tar: other bytes")
        except Exception as exc:  # noqa: BLE001 - reported to the test
            failures.append(f"s{k}-{i}.tar: {type(exc).__name__}: {exc}")
    results.put(failures)


def test_a_shard_another_process_evicts_right_after_its_download_is_still_read(tmp_path):
    """C2: the downloaded copy is handed out through the descriptor it was written and verified through, never
    opened again by name (another process's eviction may have removed it by then)."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    procs = [context.Process(target=_reader_of_its_own_shards, args=(str(tmp_path / "cache"), k, 60, 200_000,
                                                                      start, results)) for k in range(6)]
    for proc in procs:
        proc.start()
    start.set()
    failures = [failure for _ in procs for failure in results.get(timeout=120)]
    for proc in procs:
        proc.join(timeout=30)
    assert failures == []


@pytest.fixture
def small_disk(monkeypatch):
    """The cache folder on a disk of `capacity` bytes: writes past it fail with ENOSPC as a full disk's do."""
    real_write, disk = os.write, SimpleNamespace(root=None, capacity=0)

    def write(fd, data):
        if disk.root is not None and os.path.dirname(os.readlink(f"/proc/self/fd/{fd}")) == str(disk.root):
            used = sum(item.stat().st_size for item in os.scandir(disk.root) if item.is_file())
            if used + len(data) > disk.capacity:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", write)
    return disk


def test_a_full_disk_is_relieved_by_eviction_and_otherwise_the_shard_is_read_uncached(tmp_path, small_disk,
                                                                                       caplog, monkeypatch):
    """C3: a size bound larger than the disk (the default is 100 GB) or a disk others fill: writing fails with
    ENOSPC; the least recently used shards go and the write is retried once; still full, the shard is read from
    its store, with one warning; no read fails and no partial file is left."""
    cache = ShardCache(tmp_path / "cache", max_bytes=1 << 40)
    cache.root.mkdir(mode=0o700)
    small_disk.root, small_disk.capacity = cache.root, 3300
    bodies = [os.urandom(1000) for _ in range(4)]
    entries = [_entry(f"s{i}.tar", body) for i, body in enumerate(bodies)]
    for entry, body in zip(entries[:3], bodies):
        assert _read(cache, entry, Store(body)) == body
        time.sleep(0.01)
    assert _read(cache, entries[0], Store(bodies[0])) == bodies[0]  # used again: s1 is now the oldest
    assert _read(cache, entries[3], Store(bodies[3])) == bodies[3]  # ENOSPC: s1 out, written on retry
    assert sorted(p.name for p in cache.root.glob("*.tar")) == sorted(
        cache.path_of(e).name for e in (entries[0], entries[2], entries[3]))
    assert _warnings(caplog) == []

    small_disk.capacity = 500  # smaller than any shard: evicting everything does not help
    big = [_tar(f"{i}.jpg", os.urandom(2000)) for i in range(2)]
    source = _source(monkeypatch, {f"b{i}.tar": body for i, body in enumerate(big)}, cache)
    for i, body in enumerate(big):
        with source.open_shard(_shard_entry(f"b{i}.tar", body), verify_sha256=False) as tar:
            assert tar.getnames() == [f"{i}.jpg"]
    assert len(_warnings(caplog)) == 1 and "full" in _warnings(caplog)[0]
    assert [p.name for p in cache.root.iterdir() if p.name.startswith(".tmp-")] == []


def _download_slowly(root: str, body: bytes, started) -> None:
    _read(ShardCache(root, 1 << 30), _entry("slow.tar", body), Store(body, trickle=(1000, 0.05, started)))


def test_temp_files_of_killed_downloads_are_removed(tmp_path):
    """C4: a download killed midway leaves its temp file; the next eviction removes it once it is a few minutes
    old and no process holds its shard's lock (a live download's, however old, and a fresh one stay)."""
    root = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    proc = context.Process(target=_download_slowly, args=(str(root), os.urandom(100_000), started))
    proc.start()
    assert started.wait(60)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    (killed,) = root.glob(".tmp-*")
    live_sha, fresh_sha = "a" * 64, "b" * 64
    live, fresh = root / f".tmp-{live_sha}-1-00000000", root / f".tmp-{fresh_sha}-2-00000000"
    live.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - 3600
    for path in (killed, live):
        os.utime(path, (old, old))
    lock = os.open(root / f".{live_sha}.lock", os.O_RDWR | os.O_CREAT, 0o600)  # a download still under way
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert _read(ShardCache(root, 1 << 30), _entry("next.tar", b"abc"), Store(b"abc")) == b"abc"
    finally:
        os.close(lock)
    assert not killed.exists() and live.exists() and fresh.exists()


def _download_stuck(root: str, body: bytes, started) -> None:
    """A download whose store stops answering while its process holds the shard's lock."""
    _read(ShardCache(root, 1 << 30), _entry("stuck.tar", body), Store(body, trickle=(1000, 600.0, started)))


def _download_trickling(root: str, body: bytes, started) -> None:
    _read(ShardCache(root, 1 << 30), _entry("slow.tar", body), Store(body, trickle=(1000, 0.1, started)))


@pytest.mark.timeout(60)
def test_the_wait_for_another_process_download_is_bounded_unless_it_progresses(tmp_path, caplog):
    """C5: a process waiting for another's download of the same shard waits while that download writes; once it
    has not progressed for lock_wait_s the waiter reads the shard from its store (one warning naming the shard
    and the lock file) instead of waiting forever."""
    root, context = tmp_path / "cache", multiprocessing.get_context("spawn")
    body, started = os.urandom(20_000), context.Event()
    proc = context.Process(target=_download_trickling, args=(str(root), body, started))  # about 2 s
    proc.start()
    try:
        assert started.wait(60)
        store = Store(body)
        assert _read(ShardCache(root, 1 << 30, lock_wait_s=1.0), _entry("slow.tar", body), store) == body
        assert store.fetches == 0 and _warnings(caplog) == []  # waited and used its copy
    finally:
        proc.join(timeout=30)

    body, started = os.urandom(20_000), context.Event()
    proc = context.Process(target=_download_stuck, args=(str(root), body, started))
    proc.start()
    try:
        assert started.wait(60)
        entry, begun = _entry("stuck.tar", body), time.monotonic()
        assert _uncached(ShardCache(root, 1 << 30, lock_wait_s=0.5), entry, Store(body))
        assert time.monotonic() - begun < 10
        (warning,) = _warnings(caplog)
        assert "s3://b/stuck.tar" in warning and f".{entry.sha256}.lock" in warning
    finally:
        proc.kill()
        proc.join(timeout=30)


def test_failures_of_the_cache_folder_are_read_uncached_not_counted_against_the_shard(tmp_path, caplog,
                                                                                       monkeypatch):
    """C6: a cache folder that cannot be made, written or read (a file in the way, permissions, a read-only or
    failing disk) is the node's problem, not the shard's: the shard is read from its store, with one warning;
    ShardSource raises no ShardError (which would mark the shard damaged)."""
    body = _tar("0.jpg", os.urandom(500))
    entry = _shard_entry("s.tar", body)
    blocked = tmp_path / "file"
    blocked.write_text("")
    cache = ShardCache(blocked / "c", 1 << 20)
    assert _uncached(cache, entry, Store(body)) and _uncached(cache, entry, Store(body))
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"data.cache_dir {blocked / 'c'}: cannot create it")
    source = _source(monkeypatch, {"s.tar": body}, cache)
    with source.open_shard(entry, verify_sha256=True) as tar:
        assert tar.getnames() == ["0.jpg"]

    caplog.clear()
    cache = ShardCache(tmp_path / "cache", 1 << 20)
    cache.root.mkdir(mode=0o700)
    cache.path_of(entry).mkdir()  # the shard's name taken by a folder: it cannot be read nor replaced
    with _source(monkeypatch, {"s.tar": body}, cache).open_shard(entry, verify_sha256=False) as tar:
        assert tar.getnames() == ["0.jpg"]
    assert len(_warnings(caplog)) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not stop root")
def test_a_cache_folder_without_write_permission_is_read_uncached(tmp_path, caplog):
    body = os.urandom(100)
    cache = ShardCache(tmp_path / "cache", 1 << 20)
    cache.root.mkdir(mode=0o500)
    try:
        assert _uncached(cache, _entry("a.tar", body), Store(body))
        assert _uncached(cache, _entry("b.tar", body + b"b"), Store(body + b"b"))
    finally:
        cache.root.chmod(0o700)
    assert len(_warnings(caplog)) == 1


def test_a_cache_folder_other_users_can_write_is_not_used(tmp_path, caplog):
    """C7: others could remove, hold or plant files there; a folder of this user is used whatever its mode."""
    body = os.urandom(100)
    if os.geteuid() == 0:
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o777)
        os.chmod(shared, 0o777)
        os.chown(shared, 65534, 65534)
    elif os.stat("/tmp").st_uid != os.geteuid() and os.stat("/tmp").st_mode & 0o022:
        shared = "/tmp"
    else:
        pytest.skip("no folder of another user writable by others")
    assert _uncached(ShardCache(shared, 1 << 20), _entry("a.tar", body), Store(body))
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"data.cache_dir {shared}: owned by uid") and "not used" in warning
    assert not list(tmp_path.glob("shared/*")) and not list(tmp_path.glob("shared/.*"))

    mine = tmp_path / "mine"
    mine.mkdir()
    os.chmod(mine, 0o777)
    store = Store(body)
    assert _read(ShardCache(mine, 1 << 20), _entry("a.tar", body), store) == body
    assert _read(ShardCache(mine, 1 << 20), _entry("a.tar", body), store) == body and store.fetches == 1


def test_an_upper_case_sha256_is_cached_and_verified(tmp_path, monkeypatch):
    """C8: the manifest's digest is hex in either case (rtrain.data.format accepts both)."""
    body = _tar("0.jpg", os.urandom(300))
    entry = _shard_entry("s.tar", body, sha=hashlib.sha256(body).hexdigest().upper())
    cache = ShardCache(tmp_path / "cache", 1 << 20)
    assert cache.usable_for(entry) and cache.path_of(entry).name == f"{entry.sha256.lower()}.tar"
    store = Store(body)
    assert _read(cache, entry, store) == body and _read(cache, entry, store) == body and store.fetches == 1
    assert cache.path_of(entry).exists()
    for verify in (True, False):  # uncached too
        with _source(monkeypatch, {"s.tar": body}, None).open_shard(entry, verify_sha256=verify) as tar:
            assert tar.getnames() == ["0.jpg"]

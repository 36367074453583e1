"""rtrain.data.cache.ShardCache: content-addressed, verified on write and on use, one download per shard among
processes sharing it, least recently used out past the bound; what it refuses to cache is read uncached."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from rtrain.data.cache import ShardCache
from rtrain.data.stores import ShardError


def _entry(name: str, body: bytes, sha: str | None = None) -> SimpleNamespace:
    digest = sha if sha is not None else hashlib.sha256(body).hexdigest()
    return SimpleNamespace(name=name, bytes=len(body), sha256=digest)


class Store:
    """A store that counts what it serves (the cache's fetch callable)."""

    def __init__(self, body: bytes, delay_s: float = 0.0):
        self.body, self.delay_s, self.fetches = body, delay_s, 0

    def fetch(self):
        @contextmanager
        def stream():
            self.fetches += 1
            time.sleep(self.delay_s)
            yield io.BytesIO(self.body)
        return stream()


def _read(cache: ShardCache, entry, store: Store) -> bytes:
    with cache.open(entry, f"s3://b/{entry.name}", store.fetch) as handle:
        return handle.read()


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
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ShardError, match=r"^data.cache_dir .*/file/c: cannot create it"):
        _read(ShardCache(blocked / "c", 1000), _entry("ok.tar", b"abc"), Store(b"abc"))


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


def test_a_fifo_planted_under_a_shards_name_is_refused_not_waited_on(tmp_path):
    body = os.urandom(100)
    entry = _entry("f.tar", body)
    cache = ShardCache(tmp_path / "cache", max_bytes=1 << 20)
    cache.root.mkdir(mode=0o700)
    os.mkfifo(cache.path_of(entry))
    with pytest.raises(ShardError, match=r"is not a regular file"):
        _read(cache, entry, Store(body))

"""Streaming shards over HTTP from a real server on 127.0.0.1 gives the same batches as the local files."""

from __future__ import annotations

import functools
import json
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_loader_fixtures import small_cfg, write_split
from testkit import http_folder

from rtrain.data import ShardError, build_loader
from rtrain.data.format import shard_name
from rtrain.data.suspects import CrashGuard
from rtrain.data.worker import LoaderStall

pytestmark = pytest.mark.integration


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    write_split(tmp_path, "train", [6, 9, 4, 7], size=(48, 36))
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def batches(cfg, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = build_loader(cfg, "train", rank=0, world_size=1, batch_size=4, seed=2, train=True, **kwargs)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("workers,verify", [(0, False), (2, False), (0, True)])
def test_http_stream_equals_local_read(served: tuple[Path, str], workers: int, verify: bool) -> None:
    root, url = served
    local = batches(small_cfg(root, num_workers=workers))
    remote = batches(small_cfg(url, num_workers=workers, verify_sha256=verify))
    assert len(local) == len(remote) == 26 // 4
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(local, remote))


def test_http_resume_skips_consumed_samples(served: tuple[Path, str]) -> None:
    _, url = served
    cfg = small_cfg(url)
    full = batches(cfg)
    first = build_loader(cfg, "train", rank=0, world_size=1, batch_size=4, seed=2, train=True)
    head = [y.clone() for _, (_, y) in zip(range(3), first)]
    resumed = build_loader(cfg, "train", rank=0, world_size=1, batch_size=4, seed=2, train=True)
    resumed.load_state_dict(first.state_dict())
    labels = head + [y for _, y in resumed]
    assert all(torch.equal(a, b) for a, (_, b) in zip(labels, full)) and len(labels) == len(full)


def test_missing_remote_shard_is_named(served: tuple[Path, str]) -> None:
    root, url = served
    (root / "train" / shard_name("train", 2)).unlink()
    with pytest.raises(ShardError, match=r"train-000002\.tar: HTTP 404"):
        batches(small_cfg(url, on_bad_sample="raise"))
    loader = build_loader(small_cfg(url), "train", rank=0, world_size=1, batch_size=4, seed=2, train=True)
    used = sum(len(y) for _, y in loader)
    assert used + loader.stats["skipped_samples"] == 24  # 6 batches of 4; the missing shard's share skipped
    assert loader.stats["skipped_samples"] > 0 and loader.stats["skipped_shards"] == 1


def test_missing_remote_manifest_is_named(served: tuple[Path, str]) -> None:
    _, url = served
    with pytest.raises(ShardError, match="nosuch/manifest.json: HTTP 404"):
        build_loader(small_cfg(url), "nosuch", rank=0, world_size=1, batch_size=4, seed=2, train=True)


def test_a_shard_that_stalls_the_loader_twice_is_quarantined_on_the_third_attempt(tmp_path: Path) -> None:
    """Three starts of one run (three attempts), a loader worker process each, a real HTTP server whose shard 2
    stalls: the first two end in a LoaderStall naming the shard and record it; the third leaves it out, reads
    everything else, and says so."""
    write_split(tmp_path / "data", "train", [6, 9, 4, 7], size=(48, 36))
    stalling = shard_name("train", 2)
    with http_folder(tmp_path / "data", stalls=stalling) as url:
        _three_attempts(tmp_path / "run", url, stalling)


def _three_attempts(run_dir: Path, url: str, stalling: str) -> None:
    cfg = small_cfg(url, num_workers=1, loader_timeout_s=2, on_bad_sample="raise")
    for attempt in ("a1", "a2"):
        guard = CrashGuard(run_dir, run_dir / "heartbeats" / attempt, attempt, 0)
        loader = build_loader(cfg, "train", rank=0, world_size=1, batch_size=4, seed=2, train=True, guard=guard)
        assert not loader.quarantine
        with pytest.raises(LoaderStall, match=rf"rank 0: no batch .* on shard {stalling}\b"):
            for _ in loader:
                pass
    records = [json.loads(line) for line in (run_dir / "suspects.jsonl").read_text().splitlines()]
    assert [(r["attempt"], r["shard"], r["sample"]) for r in records] == [("a1", stalling, None),
                                                                           ("a2", stalling, None)]
    guard = CrashGuard(run_dir, run_dir / "heartbeats" / "a3", "a3", 0)
    loader = build_loader(cfg, "train", rank=0, world_size=1, batch_size=4, seed=2, train=True, guard=guard)
    assert loader.quarantine.names() == [f"shard {stalling}"]
    used = sum(len(y) for _, y in loader)  # under on_bad_sample: raise too: quarantine is not a bad sample
    assert used + loader.stats["skipped_samples"] == 24 and loader.stats["skipped_samples"] == 4
    assert loader.skipped_by_shard == {stalling: 4}

"""Opening a shard is retried with backoff on transient failures (a real HTTP server answering 503 first),
and a failure that persists is one line naming the URL."""

from __future__ import annotations

import functools
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_loader_fixtures import small_cfg, write_split

from rtrain.data import ShardError, build_loader
from rtrain.data.stores import HTTP_ATTEMPTS

pytestmark = pytest.mark.integration


class BusyFirstHandler(SimpleHTTPRequestHandler):
    """Answers 503 to the first `busy_for` GETs of every path, then serves the file."""

    def __init__(self, *args, seen: Counter, busy_for: int, **kwargs):
        self.seen, self.busy_for = seen, busy_for
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self.seen[self.path] += 1
        if self.seen[self.path] <= self.busy_for:
            self.send_error(503, "Slow Down")
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def busy_server(tmp_path: Path, request) -> Iterator[tuple[str, Counter]]:
    write_split(tmp_path, "train", [5, 6])
    seen: Counter = Counter()
    handler = functools.partial(BusyFirstHandler, seen=seen, busy_for=request.param, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _labels(url: str) -> list[int]:
    loader = build_loader(small_cfg(url, on_bad_sample="raise"), "train", rank=0, world_size=1, batch_size=4,
                          seed=1, train=False)
    return sorted(label for _, labels in loader for label in labels.tolist())


@pytest.mark.parametrize("busy_server", [HTTP_ATTEMPTS - 1], indirect=True)
def test_transient_503s_are_retried(busy_server: tuple[str, Counter]) -> None:
    url, seen = busy_server
    assert len(_labels(url)) == 11
    assert seen["/train/train-000001.tar"] == HTTP_ATTEMPTS


@pytest.mark.parametrize("busy_server", [HTTP_ATTEMPTS], indirect=True)
def test_a_lasting_failure_is_one_line_naming_the_url(busy_server: tuple[str, Counter]) -> None:
    url, seen = busy_server
    with pytest.raises(ShardError) as failure:
        _labels(url)
    assert str(failure.value) == f"{url}/train/manifest.json: HTTP 503 Slow Down"
    assert seen["/train/manifest.json"] == HTTP_ATTEMPTS

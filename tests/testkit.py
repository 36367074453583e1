"""Helpers of the whole suite (importable by name from any test module; conftest.py files are not): free
ports, running `python -m ...` from the repository, and folders built once per session across xdist workers."""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from rtrain._ports import unused_port


def free_port() -> int:
    return unused_port("127.0.0.1")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(*args: str, timeout: float = 600, env: dict | None = None):
    """Run `python -m ...` from the repo root; raise with its output if it fails."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"python -m {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def shared_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder built once per test session, by whichever xdist worker asks first (the others wait on a file
    lock and reuse it); `build(folder)` fills it. A build that failed is redone by the next one to ask."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # shared by the session's workers
    folder, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class TricklingHandler(QuietHandler):
    """Serves a folder; the file whose path ends with `stalls` sends its first KiBs, then a byte every 0.3 s:
    every read returns before any socket timeout, the file never ends (a stalled store, a slow-loris server)."""

    stalls = ""
    head = 1024

    def copyfile(self, source, outputfile) -> None:
        if not self.stalls or not self.path.endswith(self.stalls):
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(self.head))
        try:
            while byte := source.read(1):
                outputfile.write(byte)
                outputfile.flush()
                time.sleep(0.3)
        except (BrokenPipeError, ConnectionResetError):
            pass


@contextmanager
def http_folder(root: Path, stalls: str = "", head: int = 1024) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving `root` (one file trickling, see TricklingHandler); its URL."""
    handler = type("Handler", (TricklingHandler,), {"stalls": stalls, "head": head})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


"""A real S3-compatible server for tests: moto's standalone server as a subprocess on 127.0.0.1.

`moto_s3_server()` starts it on a free port, waits until it answers, creates a bucket and points the
standard AWS_* variables of this process (and so of every child process) at it; leaving the context stops the
server by its PID and restores the environment.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str]
    log: Path  # the server's own request log: what it was asked for, counted on the server's side
    pid: int

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def gets(self, prefix: str, suffix: str = ".tar") -> list[str]:
        """Keys under `prefix` the server answered a GET for so far, one per request (range requests too)."""
        text = self.log.read_text(errors="replace")
        return re.findall(rf'"(?:\x1b\[[0-9;]*m)*GET /{re.escape(self.bucket)}/({re.escape(prefix)}[^ ?"]*'
                          rf'{re.escape(suffix)})', text)  # werkzeug colours some lines

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(process: subprocess.Popen, endpoint: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"moto server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"moto server did not answer at {endpoint} within {START_TIMEOUT_S:.0f} s")


@contextmanager
def moto_s3_server(workdir: Path, bucket: str = "rtrain-test") -> Iterator[S3Server]:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = workdir / "moto.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        _wait_until_up(process, endpoint, log)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            patch.delenv("AWS_PROFILE", raising=False)
            server = S3Server(endpoint, bucket, env, log, process.pid)
            server.client().create_bucket(Bucket=bucket)
            yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, 9)
            process.wait()

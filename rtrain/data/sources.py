"""Where a split's shards live: a local (or shared-filesystem) directory or an http(s):// URL prefix.

The split's shards and its manifest are under `{source}/{split}/`. Local shards are opened seekable, so the
members a slot does not need are stepped over without reading their data; HTTP(S) shards are streamed in one
GET each (the access pattern object stores and web servers are good at). With `verify_sha256` a shard is read
and hashed completely before any of its samples is used, so a corrupt shard never contributes a sample.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import BinaryIO

from rtrain.data.format import MANIFEST_NAME, Manifest, ShardEntry, sha256_file

HTTP_TIMEOUT_S = 60.0
HTTP_ATTEMPTS = 3


class ShardError(RuntimeError):
    """A shard is missing, unreadable, truncated or fails its checksum; the message names it."""


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


class ShardSource:
    """Opens the manifest and the shards of one split."""

    def __init__(self, source: str, split: str):
        if not source:
            raise ValueError("data.source is empty: give a shard directory or an http(s):// URL prefix")
        root = source.removeprefix("file://")
        self.split = split
        self.location = f"{root.rstrip('/')}/{split}"
        self.remote = is_url(root)

    def shard_location(self, name: str) -> str:
        return f"{self.location}/{name}"

    def read_manifest(self) -> Manifest:
        where = self.shard_location(MANIFEST_NAME)
        if not self.remote:
            if not os.path.isfile(where):
                raise FileNotFoundError(f"{where}: manifest not found (split {self.split!r})")
            return Manifest.load(where)
        with self._open_url(where) as response:
            return Manifest.loads(response.read().decode("utf-8"), where=where)

    @contextmanager
    def open_shard(self, entry: ShardEntry, verify_sha256: bool) -> Iterator[tarfile.TarFile]:
        """The shard as a TarFile (seekable if local or verified, streaming otherwise)."""
        where = self.shard_location(entry.name)
        with ExitStack() as stack:
            try:
                if self.remote and verify_sha256:
                    local = stack.enter_context(self._download_verified(entry, where))
                    tar = stack.enter_context(tarfile.open(fileobj=local, mode="r:"))
                elif self.remote:
                    response = stack.enter_context(self._open_url(where))
                    tar = stack.enter_context(tarfile.open(fileobj=response, mode="r|"))
                else:
                    self._check_local(entry, where, verify_sha256)
                    tar = stack.enter_context(tarfile.open(where, mode="r:"))
            except (OSError, tarfile.TarError, EOFError) as exc:
                raise ShardError(f"shard {where}: cannot open ({exc})") from exc
            yield tar

    def _check_local(self, entry: ShardEntry, where: str, verify_sha256: bool) -> None:
        if not os.path.isfile(where):
            raise ShardError(f"shard {where}: missing")
        size = os.path.getsize(where)
        if size != entry.bytes:
            raise ShardError(f"shard {where}: {size} bytes, manifest says {entry.bytes} (truncated?)")
        if verify_sha256 and sha256_file(where) != entry.sha256:
            raise ShardError(f"shard {where}: sha256 does not match the manifest")

    @contextmanager
    def _download_verified(self, entry: ShardEntry, where: str) -> Iterator[BinaryIO]:
        digest = hashlib.sha256()
        with tempfile.TemporaryFile() as local:
            with self._open_url(where) as response:
                while block := response.read(1 << 20):
                    digest.update(block)
                    local.write(block)
            if digest.hexdigest() != entry.sha256:
                raise ShardError(f"shard {where}: sha256 does not match the manifest")
            local.seek(0)
            yield local

    @contextmanager
    def _open_url(self, url: str) -> Iterator[BinaryIO]:
        response = None
        for attempt in range(HTTP_ATTEMPTS):
            try:
                response = urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
                break
            except urllib.error.HTTPError as exc:
                # 4xx is final (the shard is not there); 5xx may be a busy server worth retrying.
                if exc.code < 500 or attempt == HTTP_ATTEMPTS - 1:
                    raise ShardError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
            except (urllib.error.URLError, OSError) as exc:
                if attempt == HTTP_ATTEMPTS - 1:
                    raise ShardError(f"{url}: cannot connect ({exc})") from exc
            time.sleep(0.5 * 2**attempt)
        with response:
            yield response

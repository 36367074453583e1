"""Where a split's manifest and shards live: a local (or shared-filesystem) directory, an http(s):// URL
prefix, or an fsspec URL (s3://bucket/prefix, gs://, ...); rtrain.data.stores opens the bytes.

The manifest is `{source}/{split}/manifest.json`; the shards are beside it unless the manifest names a
`shard_root` (rtrain.data.format). Local shards are opened seekable, so the members a slot does not need are
stepped over without reading their data; HTTP(S) shards are streamed in one GET each; fsspec shards are read
through range requests (see stores), or once per node into data.cache_dir (rtrain.data.cache), verified, and
from there on from that local copy. With `verify_sha256` a remote shard is downloaded to a temporary file and
hashed completely before any of its samples is used, so a corrupt shard never contributes a sample. Without
it, a truncated shard contributes the samples before the damage (rtrain.data.shardread).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, BinaryIO

from rtrain.data.cache import ShardCache
from rtrain.data.format import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    ShardEntry,
    normalized_location,
    resolve_shard_root,
    root_is_within,
    sha256_file,
)
from rtrain.data.stores import ShardError, is_http, is_remote, open_stream

__all__ = ["ShardError", "ShardSource"]


class ShardSource:
    """Opens the manifest and the shards of one split. `read_manifest` also sets `shard_root`."""

    def __init__(self, source: str, split: str, storage_options: dict[str, Any] | None = None,
                 allowed_roots: Sequence[str] = (), cache: ShardCache | None = None):
        if not source:
            raise ValueError("data.source is empty: give a shard directory or a URL prefix (http(s)://, s3://)")
        root = source.removeprefix("file://")
        self.base = normalized_location(root.rstrip("/"))
        self.split = split
        self.location = f"{root.rstrip('/')}/{split}"
        self.shard_root = self.location
        self.storage_options = dict(storage_options or {})
        self.allowed_roots = [normalized_location(r.removeprefix("file://").rstrip("/")) for r in allowed_roots]
        self.cache = cache  # remote shards only (rtrain.data.cache)

    @property
    def remote(self) -> bool:
        return is_remote(self.shard_root)

    def shard_location(self, name: str) -> str:
        return f"{self.shard_root}/{name}"

    def read_manifest(self) -> Manifest:
        where = f"{self.location}/{MANIFEST_NAME}"
        if not is_remote(where):
            if not os.path.isfile(where):
                raise FileNotFoundError(f"{where}: manifest not found (split {self.split!r})")
            manifest = Manifest.load(where)
        else:
            with open_stream(where, self.storage_options) as stream:
                text = stream.read(MAX_MANIFEST_BYTES + 1)
            if len(text) > MAX_MANIFEST_BYTES:
                raise ValueError(f"{where}: over {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest")
            manifest = Manifest.loads(text.decode("utf-8", "replace"), where=where)
        shard_root = normalized_location(resolve_shard_root(self.location, manifest.shard_root))
        if not all(any(root_is_within(seen, base) for base in bases) for seen, bases in self._root_views(
                shard_root, manifest.shard_root)):
            raise ValueError(f"{where}: shard_root {manifest.shard_root!r} points to {shard_root}, outside "
                             f"data.source ({self.base}); list it in data.allowed_shard_roots to read it")
        self.shard_root = shard_root
        return manifest

    def _root_views(self, shard_root: str, written: str | None) -> list[tuple[str, list[str]]]:
        """The shard root as the containment check must see it, each with the bases it must lie in: as written
        (normalized); for a URL also percent-decoded (`%2e%2e/` is `../` to most servers); for a folder the
        manifest names (shard_root set), also with symlinks resolved (a link inside data.source may point out)."""
        bases = [self.base, *self.allowed_roots]
        views = [(shard_root, bases)]
        if "://" in shard_root:
            decoded = normalized_location(urllib.parse.unquote(shard_root))
            views.append((decoded, [normalized_location(urllib.parse.unquote(b)) for b in bases]))
        elif written:
            views.append((os.path.realpath(shard_root), [os.path.realpath(b) for b in bases]))
        return views

    @contextmanager
    def open_shard(self, entry: ShardEntry, verify_sha256: bool) -> Iterator[tarfile.TarFile]:
        """The shard as a TarFile (seekable unless streamed over HTTP(S) without verification)."""
        where = self.shard_location(entry.name)
        with ExitStack() as stack:
            try:
                local = None  # None from the cache too: its folder cannot serve the shard (it warned), read it here
                if self.remote and self.cache is not None and self.cache.usable_for(entry):  # verified too
                    local = stack.enter_context(
                        self.cache.open(entry, where, lambda: open_stream(where, self.storage_options)))
                if local is not None:
                    tar = stack.enter_context(tarfile.open(fileobj=local, mode="r:"))
                elif self.remote and verify_sha256:
                    local = stack.enter_context(self._download_verified(entry, where))
                    tar = stack.enter_context(tarfile.open(fileobj=local, mode="r:"))
                elif self.remote:
                    stream = stack.enter_context(open_stream(where, self.storage_options))
                    mode = "r|" if is_http(where) else "r:"
                    tar = stack.enter_context(tarfile.open(fileobj=stream, mode=mode))
                else:
                    self._check_local(entry, where, verify_sha256)
                    tar = stack.enter_context(tarfile.open(where, mode="r:"))
            except (OSError, tarfile.TarError, EOFError, ValueError, OverflowError, MemoryError) as exc:
                # tarfile parses the first header itself; a lying one may raise any of these
                raise ShardError(f"shard {where}: cannot open ({type(exc).__name__}: {exc})") from exc
            yield tar

    def _check_local(self, entry: ShardEntry, where: str, verify_sha256: bool) -> None:
        """A shard shorter than the manifest says is opened anyway (unless every byte must verify): the tar
        reader delivers its samples up to where the bytes end and names the first one missing. A longer
        one, or one failing its sha256, may be altered anywhere and is not used at all."""
        if not os.path.isfile(where):
            raise ShardError(f"shard {where}: missing")
        size = os.path.getsize(where)
        if size > entry.bytes or (size < entry.bytes and verify_sha256):
            kind = "truncated; data.verify_sha256 uses no unverified bytes" if size < entry.bytes else "rewritten?"
            raise ShardError(f"shard {where}: {size} bytes, manifest says {entry.bytes} ({kind})")
        if verify_sha256 and sha256_file(where) != entry.sha256.lower():  # the manifest's hex may be upper case
            raise ShardError(f"shard {where}: sha256 does not match the manifest")

    @contextmanager
    def _download_verified(self, entry: ShardEntry, where: str) -> Iterator[BinaryIO]:
        digest, size = hashlib.sha256(), 0
        with tempfile.TemporaryFile() as local:
            with open_stream(where, self.storage_options) as stream:
                while block := stream.read(1 << 20):
                    size += len(block)
                    if size > entry.bytes:  # never more on disk than the manifest promised
                        raise ShardError(f"shard {where}: longer than the {entry.bytes} bytes the manifest says")
                    digest.update(block)
                    local.write(block)
            if digest.hexdigest() != entry.sha256.lower():
                raise ShardError(f"shard {where}: sha256 does not match the manifest")
            local.seek(0)
            yield local

"""Local folders and object stores for data_prep: list shards, write a manifest, upload a finished output.

Locations are local paths or URLs (`s3://bucket/prefix`, any fsspec URL; http(s) for reading explicit shard
URLs only). Object-store access goes through fsspec with the endpoint and credentials of the standard AWS_*
environment (rtrain.data.stores), so data_prep and the loader see the same store.

Writing to an object store is "build locally, then upload": shards are built (resumably) in a local staging
folder exactly as for a local --out, then `upload_output` copies each split's shards and, last, its
manifest. A split's remote manifest is deleted before its shards are replaced, so a reader never finds a
manifest next to shards it does not describe; an interrupted upload is completed by running it again
(shards already there with the right size are not sent again).
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from rtrain._io import write_atomically
from rtrain.data.format import MANIFEST_NAME, Manifest
from rtrain.data.stores import ShardError, fsspec_target, is_http, is_remote

SHARD_SUFFIX = ".tar"


def join(location: str, *parts: str) -> str:
    return "/".join([location.rstrip("/"), *parts])


def absolute(location: str) -> str:
    """URLs as given (without a trailing slash); local paths made absolute."""
    return location.rstrip("/") if is_remote(location) else str(Path(location.removeprefix("file://")).resolve())


def _list_folder(location: str, storage_options: dict[str, Any] | None) -> list[str]:
    if is_http(location):
        raise ValueError(f"{location}: cannot list an http(s) folder; give the shard URLs (braces allowed: "
                         f"{location}/train-{{000000..000099}}.tar)")
    if not is_remote(location):
        folder = Path(location)
        if not folder.is_dir():
            raise ValueError(f"{location}: no such folder")
        return [str(path) for path in sorted(folder.glob(f"*{SHARD_SUFFIX}"))]
    fs, path = fsspec_target(location, storage_options)
    try:
        found = sorted(fs.glob(f"{path.rstrip('/')}/*{SHARD_SUFFIX}"))
    except (FileNotFoundError, PermissionError, OSError) as exc:
        raise ValueError(f"{location}: cannot list ({type(exc).__name__}: {' '.join(str(exc).split())})") from exc
    scheme = location.split("://", 1)[0]
    return [f"{scheme}://{item}" for item in found]


def expand_shards(specs: list[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Shard locations from folders/prefixes (their *.tar, sorted) and shard paths/URLs (braces expanded)."""
    shards: list[str] = []
    for spec in specs:
        if spec.rstrip("/").endswith(SHARD_SUFFIX) or "{" in spec:
            shards.extend(absolute(item) for item in braceexpand(spec))
        else:
            found = _list_folder(absolute(spec), storage_options)
            if not found:
                raise ValueError(f"{spec}: no *{SHARD_SUFFIX} shards there")
            shards.extend(found)
    if len(set(shards)) != len(shards):
        raise ValueError("a shard is named more than once in the inputs")
    return shards


def common_root(shards: list[str]) -> tuple[str, list[str]]:
    """(root, names): the deepest folder holding every shard, and each shard's path below it."""
    schemes = {shard.split("://", 1)[0] if "://" in shard else "" for shard in shards}
    if len(schemes) != 1:
        raise ValueError(f"shards must all be local or all under one URL scheme, got {sorted(schemes)}")
    scheme = schemes.pop()
    prefix = f"{scheme}://" if scheme else ""
    paths = [shard.removeprefix(prefix) for shard in shards]
    root = posixpath.commonpath([posixpath.dirname(path) or "/" for path in paths]) if paths else ""
    if scheme and not root.strip("/"):
        raise ValueError("shards in different buckets/hosts cannot share one manifest")
    return prefix + root, [posixpath.relpath(path, root) for path in paths]


def read_text(location: str, storage_options: dict[str, Any] | None = None) -> str:
    from rtrain.data.stores import open_stream

    try:
        with open_stream(absolute(location), storage_options) as stream:
            return stream.read().decode("utf-8")
    except ShardError as exc:
        raise ValueError(str(exc)) from exc


def write_manifest(split_location: str, manifest: Manifest,
                   storage_options: dict[str, Any] | None = None) -> str:
    """Write `manifest.json` into a local folder (atomically) or under a URL prefix; returns where."""
    where = join(split_location, MANIFEST_NAME)
    if not is_remote(split_location):
        Path(split_location).mkdir(parents=True, exist_ok=True)
        write_atomically(Path(where), manifest.to_json(), f".{MANIFEST_NAME}.tmp")
        return where
    fs, path = fsspec_target(where, storage_options)
    fs.pipe_file(path, manifest.to_json().encode("utf-8"))
    fs.invalidate_cache()
    return where


def upload_output(local_out: Path, url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Copy every split of a finished data_prep output (folders holding a manifest) under `url`."""
    splits = sorted(path.parent for path in Path(local_out).glob(f"*/{MANIFEST_NAME}"))
    if not splits:
        raise ValueError(f"{local_out}: no <split>/{MANIFEST_NAME} to upload")
    uploaded = []
    for split_dir in splits:
        manifest = Manifest.load(split_dir / MANIFEST_NAME)
        remote = join(url, split_dir.name)
        fs, path = fsspec_target(remote, storage_options)
        if fs.exists(join(path, MANIFEST_NAME)):
            fs.rm_file(join(path, MANIFEST_NAME))
        for entry in manifest.shards:
            target = join(path, entry.name)
            if fs.exists(target) and fs.size(target) == entry.bytes:
                continue
            fs.put_file(str(split_dir / entry.name), target)
        fs.put_file(str(split_dir / MANIFEST_NAME), join(path, MANIFEST_NAME))
        fs.invalidate_cache()
        uploaded.append(remote)
    return uploaded

"""The shard plan: which source files go, in which order, into which shard.

The plan is a pure function of (file list, seed, shard size), so a resumed run and a fresh run agree on
every shard. Files are ordered by sha256(seed, key): a global shuffle that does not depend on listing order,
Python's RNG or NumPy's stream versions. Sharding by bytes uses the SOURCE file sizes for the same reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import PurePath

from data_prep.quirks import ImageOptions

PREP_FORMAT = "rtrain-data_prep/1"


@dataclass(frozen=True)
class SourceFile:
    """One input file: ``key`` is unique within its split, ``relpath`` is relative to the source root."""

    key: str
    relpath: str
    cls: int
    size: int


@dataclass(frozen=True)
class ShardSize:
    """Exactly one of ``samples`` / ``bytes`` (source bytes per shard) is set."""

    samples: int | None = 1000
    bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.samples is None) == (self.bytes is None):
            raise ValueError("shard size: give exactly one of samples or bytes")
        if (self.samples or self.bytes or 0) < 1:
            raise ValueError(f"shard size must be positive, got {self}")


def file_key(name: str) -> str:
    """A sample key from a file name: no extension, no dots (webdataset splits member names at the first dot)."""
    return PurePath(name).stem.replace(".", "_")


def shuffle_order(key: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\0{key}".encode()).digest()


def shuffled(files: list[SourceFile], seed: int) -> list[SourceFile]:
    return sorted(files, key=lambda f: (shuffle_order(f.key, seed), f.key))


def split_into_shards(files: list[SourceFile], size: ShardSize) -> list[tuple[SourceFile, ...]]:
    if size.samples is not None:
        return [tuple(files[i : i + size.samples]) for i in range(0, len(files), size.samples)]
    shards: list[tuple[SourceFile, ...]] = []
    current: list[SourceFile] = []
    current_bytes = 0
    for source in files:
        if current and current_bytes + source.size > size.bytes:
            shards.append(tuple(current))
            current, current_bytes = [], 0
        current.append(source)
        current_bytes += source.size
    if current:
        shards.append(tuple(current))
    return shards


def plan_shards(files: list[SourceFile], seed: int, size: ShardSize) -> list[tuple[SourceFile, ...]]:
    return split_into_shards(shuffled(files, seed), size)


def shard_fingerprint(files: tuple[SourceFile, ...], image_options: ImageOptions) -> str:
    """Identifies what a shard must contain; a finished shard is reused only when this matches."""
    spec = {
        "format": PREP_FORMAT,
        "image_options": asdict(image_options),
        "files": [[f.key, f.relpath, f.cls, f.size] for f in files],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

"""Shard and manifest format shared by data_prep (writer) and rtrain.data (reader).

A split directory holds `{split}-{index:06d}.tar` shards and one `manifest.json`. Each tar member set
is one sample: `{key}.jpg` (JPEG bytes) and `{key}.cls` (the class index as ASCII decimal). The manifest
is the single source of truth for epoch length and shard balancing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rtrain._io import sha256_file  # noqa: F401  (re-exported: data_prep, benchmarks and tests import it from here)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
SAMPLE_FIELDS = ("jpg", "cls")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


@dataclass(frozen=True)
class ShardEntry:
    name: str
    count: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class QuarantinedFile:
    path: str
    reason: str


@dataclass
class Manifest:
    split: str
    shards: list[ShardEntry]
    classes: dict[str, int]
    converted: dict[str, int] = field(default_factory=dict)
    quarantined: list[QuarantinedFile] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "manifest") -> "Manifest":
        try:
            version = int(raw.get("version", 0))
            if version != MANIFEST_VERSION:
                raise ValueError(f"version {version}, expected {MANIFEST_VERSION}")
            return cls(
                split=str(raw["split"]),
                shards=[ShardEntry(**s) for s in raw["shards"]],
                classes={str(k): int(v) for k, v in raw["classes"].items()},
                converted={str(k): int(v) for k, v in raw.get("converted", {}).items()},
                quarantined=[QuarantinedFile(**q) for q in raw.get("quarantined", [])],
                options=dict(raw.get("options", {})),
                version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: not a valid rtrain manifest ({exc!r})") from exc

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read manifest ({exc})") from exc
        return cls.from_dict(raw, where=str(path))

    @classmethod
    def loads(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: cannot parse manifest ({exc})") from exc
        return cls.from_dict(raw, where=where)


def encode_cls(index: int) -> bytes:
    return str(int(index)).encode("ascii")


def decode_cls(raw: bytes) -> int:
    return int(raw.decode("ascii").strip())

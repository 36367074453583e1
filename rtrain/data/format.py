"""Shard and manifest format shared by data_prep (writer) and rtrain.data (reader).

A split directory holds `{split}-{index:06d}.tar` shards and one `manifest.json`. Each tar member set
is one sample: `{key}.jpg` (JPEG bytes) and `{key}.cls` (the class index as ASCII decimal). The manifest
is the single source of truth for epoch length and shard balancing.

Manifest version 2 adds two things, both defaulting to what version 1 meant, so version 1 manifests load
unchanged; a manifest is written as version 1 while both are at their defaults (data_prep's own output stays
readable by older rtrain), as version 2 otherwise (older rtrain then refuses it instead of misreading it):
- `keys`: which members hold the image and the label (`SampleKeys`), for shards that other tools wrote
  (`jpeg`/`png`/`webp` images; `cls.txt` ASCII labels; a field of a `json` member).
- `shard_root`: where the shards are. Null = beside the manifest (data_prep's own output). Otherwise an
  absolute path or a URL (`s3://bucket/prefix`, `https://...`), or a path relative to the manifest's folder
  (`../mirror/train`). A shard's location is `{shard_root}/{name}`; a `name` may hold `/` (sub-folders).

`empty_classes` (optional, any version; written only when not empty) lists the class folders data_prep found
without any file: left out of `classes` by default, still in it with `--keep-empty-classes`.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rtrain._io import sha256_file  # noqa: F401  (re-exported: data_prep, benchmarks and tests import it from here)

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is read into memory whole: ImageNet's train split's is ~200 KB
TAR_BLOCK = 512  # every sample takes at least one tar header block: a shard of B bytes holds <= B / 512
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)
SAMPLE_FIELDS = ("jpg", "cls")  # what data_prep's own shards hold (SampleKeys' defaults)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


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


@dataclass(frozen=True)
class SampleKeys:
    """Member extensions of a sample's image and label. A label key ending in `json` is a JSON object whose
    `label_field` holds the label; any other label member is the label as ASCII text. A label is a class
    index, or a class name listed in the manifest's `classes`."""

    image: str = SAMPLE_FIELDS[0]
    label: str = SAMPLE_FIELDS[1]
    label_field: str | None = None

    def __post_init__(self) -> None:
        if not self.image or not self.label or self.image == self.label:
            raise ValueError(f"image key {self.image!r} and label key {self.label!r} must differ and be set")
        if self.label.endswith("json") and not self.label_field:
            raise ValueError(f"label key {self.label!r} is JSON: label_field must name the label's field")

    @property
    def fields(self) -> tuple[str, str]:
        return self.image, self.label


def _checked_pixels(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"checked_pixels must be a positive integer, got {value!r}")
    return value


@dataclass
class Manifest:
    split: str
    shards: list[ShardEntry]
    classes: dict[str, int]
    converted: dict[str, int] = field(default_factory=dict)
    quarantined: list[QuarantinedFile] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    keys: SampleKeys = field(default_factory=SampleKeys)
    shard_root: str | None = None
    version: int = MANIFEST_VERSION
    empty_classes: list[str] = field(default_factory=list)  # class folders data_prep found without any file
    # data_prep read every image's header and quarantined those claiming more pixels than this: what a decoder
    # without a per-sample check of its own (DALI's) relies on. None: nobody checked.
    checked_pixels: int | None = None

    @property
    def format_version(self) -> int:
        """The oldest version that can describe this manifest (what `to_json` writes)."""
        return 1 if self.keys == SampleKeys() and not self.shard_root else MANIFEST_VERSION

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> str:
        raw = {**asdict(self), "version": self.format_version}
        if not self.empty_classes:  # written only when there are some: other manifests stay as they were
            del raw["empty_classes"]
        if self.checked_pixels is None:
            del raw["checked_pixels"]
        return json.dumps(raw, indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "manifest") -> "Manifest":
        try:
            if not isinstance(raw, dict):
                raise TypeError(f"a manifest is a JSON object, got {type(raw).__name__}")
            version = int(raw.get("version", 0))
            if version not in READABLE_VERSIONS:
                raise ValueError(f"version {version}, this rtrain reads versions {READABLE_VERSIONS}")
            root = raw.get("shard_root")
            return cls(
                split=str(raw["split"]),
                shards=[checked_entry(s, i) for i, s in enumerate(raw["shards"])],
                classes={str(k): int(v) for k, v in raw["classes"].items()},
                converted={str(k): int(v) for k, v in raw.get("converted", {}).items()},
                quarantined=[QuarantinedFile(**q) for q in raw.get("quarantined", [])],
                options=dict(raw.get("options", {})),
                keys=SampleKeys(**raw.get("keys", {})),
                shard_root=str(root) if root else None,
                version=version,
                empty_classes=[str(name) for name in raw.get("empty_classes", [])],
                checked_pixels=_checked_pixels(raw.get("checked_pixels")),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ValueError(f"{where}: not a valid rtrain manifest ({exc!r})") from exc

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        try:
            if path.stat().st_size > MAX_MANIFEST_BYTES:
                raise ValueError(f"{path}: over {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest")
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{path}: cannot read manifest ({exc})") from exc
        return cls.from_dict(raw, where=str(path))

    @classmethod
    def loads(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{where}: cannot parse manifest ({exc})") from exc
        return cls.from_dict(raw, where=where)


def checked_entry(raw: dict[str, Any], index: int) -> ShardEntry:
    """A manifest's shard entry, taken as data, not as directions: a plain relative name (sub-folders allowed,
    nothing absolute, no `..`, no URL), a count and a size that can be true of each other, a sha256 in hex."""
    entry = ShardEntry(**raw)
    what = f"shards[{index}] ({str(entry.name)[:80]!r})"
    if not is_plain_name(entry.name):
        raise ValueError(f"{what}: a shard name is a plain relative path inside the shard root")
    for key in ("count", "bytes"):
        value = getattr(entry, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{what}: {key} {value!r} is not a count")
    if entry.count * TAR_BLOCK > entry.bytes:
        raise ValueError(f"{what}: {entry.count} samples cannot fit in {entry.bytes} bytes")
    if not isinstance(entry.sha256, str) or (entry.sha256 and not _is_hex_digest(entry.sha256)):
        raise ValueError(f"{what}: sha256 {str(entry.sha256)[:80]!r} is not a hex digest")
    return entry


def is_plain_name(name: Any) -> bool:
    """`train-000001.tar` or `sub/dir/x.tar`: relative, normalized, no `..`, no scheme, no control bytes."""
    if not isinstance(name, str) or not name or len(name) > 1024 or "://" in name or "\\" in name:
        return False
    if name.startswith("/") or any(ord(c) < 32 for c in name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _is_hex_digest(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text.lower())


def normalized_location(location: str) -> str:
    """A path or URL with `.` and `..` resolved (a URL's scheme and host kept)."""
    scheme, sep, path = location.rpartition("://")
    if sep:
        host, slash, rest = path.partition("/")
        return f"{scheme}://{host}" + (posixpath.normpath("/" + rest) if slash and rest else "")
    return posixpath.normpath(location)


def root_is_within(root: str, base: str) -> bool:
    """Whether the shard root `root` (a path or URL, normalized) lies inside `base` (data.source)."""
    root, base = root.rstrip("/"), base.rstrip("/")
    return root == base or root.startswith(base + "/")


def encode_cls(index: int) -> bytes:
    return str(int(index)).encode("ascii")


def decode_cls(raw: bytes) -> int:
    return int(raw.decode("ascii").strip())


def label_value(raw: bytes, keys: SampleKeys) -> int | str:
    """The label as written in its member: a class index or a class name; ValueError (one line) otherwise."""
    if keys.label.endswith("json"):
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"not JSON ({exc})") from exc
        if not isinstance(record, dict) or keys.label_field not in record:
            raise ValueError(f"no field {keys.label_field!r}")
        value = record[keys.label_field]
    else:
        try:
            value = raw.decode("ascii").strip()
        except UnicodeDecodeError as exc:
            raise ValueError(f"{raw[:20]!r} is not ASCII") from exc
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    if isinstance(value, int | str) and not isinstance(value, bool) and value != "":
        return value
    raise ValueError(f"{str(value)[:40]!r} is neither a class index nor a class name")


def decode_label(raw: bytes, keys: SampleKeys, classes: dict[str, int]) -> int:
    """The class index in a label member (a class name is looked up in `classes`); ValueError otherwise."""
    value = label_value(raw, keys)
    if isinstance(value, int):
        return value
    if value not in classes:
        raise ValueError(f"class name {value[:40]!r} is not in the manifest's classes")
    return classes[value]


def resolve_shard_root(manifest_dir: str, shard_root: str | None) -> str:
    """Where a manifest's shards are: `shard_root` as given when absolute or a URL, else relative to the
    manifest's folder (a path or a URL prefix)."""
    if not shard_root:
        return manifest_dir
    if "://" in shard_root or posixpath.isabs(shard_root):
        return shard_root.rstrip("/")
    scheme, sep, path = manifest_dir.rpartition("://")
    joined = posixpath.normpath(posixpath.join(path, shard_root))
    return f"{scheme}{sep}{joined}" if sep else joined

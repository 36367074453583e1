"""Read one existing WebDataset shard end to end: its size and sha256, and every sample checked.

Samples are grouped as webdataset groups them (members in a row sharing the key: the path up to the first
dot of the file name, rtrain.data.shardread). A sample must have the image and the label member named by
the manifest's SampleKeys; the image must be readable (JPEG: the same structure walk or 1/8-scale decode as
data_prep.quirks; PNG/WebP/others: decoded by Pillow) and the label must parse (rtrain.data.format).
Whether a label is in range is decided once the class list is known (data_prep.index), from the labels
collected here. Problems are one line each: ``<shard>: sample '<key>': <what> (key <member>)``.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from PIL import Image

from data_prep.quirks import DECODE_ERRORS, JPEG_MAGIC, OPENED_FORMATS, jpeg_decode_error, jpeg_structure_error
from rtrain.data.format import IMAGE_KEYS, SampleKeys, ShardEntry, label_value
from rtrain.data.shardread import split_member_name
from rtrain.data.stores import ShardError, open_stream

LABEL_KEYS = ("cls", "cls.txt", "json")
MAX_PROBLEMS_PER_SHARD = 5


@dataclass
class ShardScan:
    """What one shard holds: its manifest entry, problems, and its labels (value -> count, first key)."""

    location: str
    entry: ShardEntry | None = None
    problems: list[str] = field(default_factory=list)
    labels: Counter = field(default_factory=Counter)
    first_key: dict[Any, str] = field(default_factory=dict)


class HashingReader:
    """A read-only stream that hashes and counts what passes through it (for streaming tar reads)."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def image_error(raw: bytes, check: str) -> str | None:
    if not raw:
        return "empty image"
    if raw.startswith(JPEG_MAGIC):
        return jpeg_decode_error(raw) if check == "decode" else jpeg_structure_error(raw)
    try:
        with Image.open(io.BytesIO(raw), formats=OPENED_FORMATS) as image:
            image.load()
    except DECODE_ERRORS as exc:
        return f"not a readable image ({type(exc).__name__}: {' '.join(str(exc).split())})"
    return None


def iter_samples(tar: tarfile.TarFile, fields: tuple[str, ...]):
    """(key, {extension: bytes} of the wanted fields, every extension seen) per sample, in tar order."""
    key, found, seen = None, {}, []
    for member in tar:
        if not member.isfile():
            continue
        member_key, ext = split_member_name(member.name)
        if member_key != key:
            if key is not None:
                yield key, found, seen
            key, found, seen = member_key, {}, []
        seen.append(ext)
        if ext in fields:
            handle = tar.extractfile(member)
            found[ext] = handle.read() if handle is not None else b""
    if key is not None:
        yield key, found, seen


def detect_keys(location: str, image: str, label: str, label_field: str,
                storage_options: dict[str, Any] | None = None) -> SampleKeys:
    """SampleKeys with `auto` resolved from the first sample of the shard at `location`."""
    if image != "auto" and label != "auto":
        return SampleKeys(image, label, label_field if label.endswith("json") else None)
    with open_stream(location, storage_options) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        first = next(iter_samples(tar, ()), None)
    if first is None:
        raise ValueError(f"{location}: no samples to detect the image/label keys from")
    key, _, seen = first
    if image == "auto":
        image = _first_present(location, key, "image", IMAGE_KEYS, seen)
    if label == "auto":
        label = _first_present(location, key, "label", LABEL_KEYS, seen)
    return SampleKeys(image, label, label_field if label.endswith("json") else None)


def _first_present(location: str, key: str, what: str, candidates: tuple[str, ...], seen: list[str]) -> str:
    for candidate in candidates:
        if candidate in seen:
            return candidate
    raise ValueError(f"{location}: sample {key!r} has no {what} member (looked for {', '.join(candidates)}; "
                     f"found {', '.join(seen) or 'nothing'}): name it with --{what}-key")


def _sample_problems(scan: ShardScan, key: str, found: dict[str, bytes], keys: SampleKeys, check: str) -> list[str]:
    where = f"{scan.location}: sample {key!r}"
    missing = [name for name in keys.fields if name not in found]
    if missing:
        return [f"{where}: no {' or '.join(missing)} member (key {missing[0]})"]
    problems = []
    error = image_error(found[keys.image], check)
    if error is not None:
        problems.append(f"{where}: image does not decode: {error} (key {keys.image})")
    try:
        value = label_value(found[keys.label], keys)
        scan.labels[value] += 1
        scan.first_key.setdefault(value, key)
    except ValueError as exc:
        problems.append(f"{where}: bad label: {exc} (key {keys.label})")
    return problems


def scan_shard(location: str, name: str, keys: SampleKeys, check: str = "structure",
               storage_options: dict[str, Any] | None = None) -> ShardScan:
    """Read the shard at `location` once (streamed), hashing it and checking each sample."""
    scan = ShardScan(location)
    problems, keys_seen, count = [], set(), 0
    try:
        with open_stream(location, storage_options) as stream:
            hashing = HashingReader(stream)
            with tarfile.open(fileobj=hashing, mode="r|") as tar:
                for key, found, _ in iter_samples(tar, keys.fields):
                    count += 1
                    if key in keys_seen:
                        problems.append(f"{location}: sample {key!r}: key appears in more than one sample")
                    keys_seen.add(key)
                    problems.extend(_sample_problems(scan, key, found, keys, check))
            hashing.drain()  # the end-of-archive padding counts for bytes and sha256
    except ShardError as exc:
        scan.problems = [str(exc)]
        return scan
    except (tarfile.TarError, OSError, EOFError) as exc:
        scan.problems = [f"{location}: unreadable tar after {count} samples ({' '.join(str(exc).split())})"]
        return scan
    if len(problems) > MAX_PROBLEMS_PER_SHARD:
        problems = problems[:MAX_PROBLEMS_PER_SHARD] + [
            f"{location}: ... and {len(problems) - MAX_PROBLEMS_PER_SHARD} more problem(s)"]
    scan.problems = problems
    scan.entry = ShardEntry(name=name, count=count, bytes=hashing.size, sha256=hashing.digest.hexdigest())
    return scan

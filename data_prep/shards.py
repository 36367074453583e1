"""Write one shard deterministically, atomically and resumably; read shards back for verification.

Tar members are byte-deterministic: GNU format, mtime 0, uid/gid 0, empty uname/gname, mode 0o644, and
within a sample the members ``{key}.cls`` then ``{key}.jpg`` (sorted by extension). A shard is written to a
temp name in the split directory, fsynced and renamed; then a receipt ``.receipts/{shard}.json`` records
the plan fingerprint, the ShardEntry and what was converted or quarantined. A rerun reuses a shard only if
its receipt matches the current plan and the tar on disk still has the recorded size and sha256.
"""

from __future__ import annotations

import json
import tarfile
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from data_prep.plan import SourceFile
from data_prep.quirks import ImageOptions, sanitize_image
from rtrain._io import HashingWriter, atomic_file, sha256_file, write_atomically
from rtrain.data.format import QuarantinedFile, ShardEntry, encode_cls

RECEIPTS_DIR = ".receipts"
TEMP_MARKER = ".tmp-"
MEMBER_MODE = 0o644


@dataclass(frozen=True)
class ShardJob:
    """Everything one Ray task needs to write one shard."""

    name: str
    files: tuple[SourceFile, ...]
    src_root: str
    split_dir: str
    image_options: ImageOptions
    fingerprint: str


@dataclass
class ShardResult:
    entry: ShardEntry
    inputs: int
    converted: dict[str, int] = field(default_factory=dict)
    quarantined: list[QuarantinedFile] = field(default_factory=list)
    grayscale: int = 0

    def to_receipt(self, fingerprint: str) -> str:
        return json.dumps({"fingerprint": fingerprint, **asdict(self)}, indent=1, sort_keys=True)

    @classmethod
    def from_receipt(cls, raw: dict) -> "ShardResult":
        return cls(
            entry=ShardEntry(**raw["entry"]),
            inputs=int(raw["inputs"]),
            converted={str(k): int(v) for k, v in raw["converted"].items()},
            quarantined=[QuarantinedFile(**q) for q in raw["quarantined"]],
            grayscale=int(raw["grayscale"]),
        )


def _member_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


class DeterministicTarWriter:
    """Writes exactly what tarfile (GNU format) writes for these members, minus its per-member copying."""

    def __init__(self, out) -> None:
        self.out, self.offset = out, 0

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.offset += len(data)

    def add(self, name: str, payload: bytes) -> None:
        self._write(_member_header(name, len(payload)))
        self._write(payload)
        self._write(b"\0" * (-len(payload) % tarfile.BLOCKSIZE))

    def close(self) -> None:
        self._write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
        self._write(b"\0" * (-self.offset % tarfile.RECORDSIZE))


def _read_source(path: Path) -> bytes | str:
    try:
        return path.read_bytes()
    except OSError as exc:
        return f"unreadable file ({exc.strerror or exc})"


def _write_samples(tar: DeterministicTarWriter, job: ShardJob) -> tuple[int, Counter, list[QuarantinedFile], int]:
    written, converted, quarantined, grayscale = 0, Counter(), [], 0
    for source in job.files:
        raw = _read_source(Path(job.src_root) / source.relpath)
        outcome = sanitize_image(raw, job.image_options) if isinstance(raw, bytes) else None
        if outcome is None or outcome.jpeg is None:
            reason = raw if outcome is None else outcome.quarantine_reason
            quarantined.append(QuarantinedFile(path=source.relpath, reason=reason))
            continue
        tar.add(f"{source.key}.cls", encode_cls(source.cls))
        tar.add(f"{source.key}.jpg", outcome.jpeg)
        written += 1
        converted.update([outcome.conversion] if outcome.conversion else [])
        grayscale += outcome.grayscale
    return written, converted, quarantined, grayscale


def temp_name(final_name: str, unique: str | None = None) -> str:
    """The name a file is written under before its rename: hidden and carrying TEMP_MARKER, so a later
    run's cleanup (build._remove_leftovers) finds what a killed run left behind."""
    return f".{final_name}{TEMP_MARKER}{unique if unique is not None else uuid.uuid4().hex}"


def write_shard(job: ShardJob) -> ShardResult:
    split_dir = Path(job.split_dir)
    final = split_dir / job.name
    with atomic_file(final, temp_name(job.name)) as raw_file:
        hashing = HashingWriter(raw_file)  # the shard is never re-read for its sha256
        tar = DeterministicTarWriter(hashing)
        written, converted, quarantined, grayscale = _write_samples(tar, job)
        tar.close()
    entry = ShardEntry(name=job.name, count=written, bytes=hashing.size, sha256=hashing.hexdigest())
    result = ShardResult(entry, len(job.files), dict(sorted(converted.items())), quarantined, grayscale)
    receipts = split_dir / RECEIPTS_DIR
    receipts.mkdir(exist_ok=True)
    receipt_name = f"{job.name}.json"
    write_atomically(receipts / receipt_name, result.to_receipt(job.fingerprint), temp_name(receipt_name))
    return result


def completed_result(job: ShardJob) -> ShardResult | None:
    """The recorded result when this shard already exists, matches the plan and its bytes verify."""
    receipt = Path(job.split_dir) / RECEIPTS_DIR / f"{job.name}.json"
    shard = Path(job.split_dir) / job.name
    try:
        raw = json.loads(receipt.read_text())
        if raw.get("fingerprint") != job.fingerprint:
            return None
        result = ShardResult.from_receipt(raw)
        if shard.stat().st_size != result.entry.bytes or sha256_file(shard) != result.entry.sha256:
            return None
        return result
    except (OSError, ValueError, KeyError, TypeError):
        return None


def iter_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, in tar order; raises ValueError on a malformed shard."""
    current_key, fields = None, {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    raise ValueError(f"member {member.name!r} is not a regular file")
                key, dot, extension = member.name.partition(".")
                if not dot or "/" in member.name:
                    raise ValueError(f"member {member.name!r} is not '<key>.<field>'")
                if key != current_key:
                    if current_key is not None:
                        yield current_key, fields
                    current_key, fields = key, {}
                fields[extension] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(f"unreadable tar ({exc})") from exc
    if current_key is not None:
        yield current_key, fields


def ensure_shard(job: ShardJob) -> tuple[ShardResult, bool]:
    """(result, reused): reuse the shard on disk when it verifies against the plan, else (re)write it."""
    existing = completed_result(job)
    if existing is not None:
        return existing, True
    return write_shard(job), False

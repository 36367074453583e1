"""Samples out of one shard's tar: group members by key, read only the positions a slot needs.

Members belong to the same sample while their key (the path up to the first dot of the file name, as in
webdataset) stays the same; a sample's position is its index in the shard. Members of positions nobody
needs are never read (a seekable tar steps over their data), which is how a resumed run skips the samples
it already consumed without reading or decoding them.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from rtrain.data.format import SAMPLE_FIELDS


@dataclass
class RawSample:
    """Undecoded sample: its key and the bytes of the fields the loader uses."""

    shard: str
    key: str
    fields: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardDamage:
    """Why the positions a slot still needed from a shard never arrived: the shard is unusable from sample
    `offset` (its position in the shard) on; the samples before it were delivered."""

    shard: str
    offset: int
    count: int  # samples the manifest lists
    cause: str

    @property
    def message(self) -> str:
        if self.offset == 0:
            return f"shard {self.shard}: {self.cause}: none of its {self.count} samples is usable"
        return f"shard {self.shard}: damaged from sample {self.offset} of {self.count}: {self.cause}"


def damage_from_error(shard: str, error: Exception, offset: int, count: int) -> ShardDamage:
    """A ShardError ("shard <location>: why" or "<location>: why") as damage from `offset` on."""
    text = " ".join(str(error).split())
    for prefix in (f"shard {shard}: ", f"{shard}: "):
        text = text.removeprefix(prefix)
    return ShardDamage(shard, offset, count, text)


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/n01_1.jpg` -> (`dir/n01_1`, `jpg`); webdataset's key/extension rule."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext.lower() if dot else ""


def read_positions(tar: tarfile.TarFile, shard: str, wanted: set[int], expected_count: int,
                   fields: tuple[str, ...] = SAMPLE_FIELDS) -> Iterator[tuple[int, RawSample | ShardDamage]]:
    """Yield (position, sample) for every wanted position, in shard order.

    Only the members named in `fields` (extensions) are read. A wanted position that the tar does not deliver
    (truncated or short shard, unreadable member) is yielded as (position, ShardDamage) after the readable
    ones, so a consumer never waits for it. Every sample before the damage whose fields were read completely
    is delivered: a truncated shard still gives its readable prefix.
    """
    pending = set(wanted)
    last = max(wanted) if wanted else -1
    position, key, sample = -1, None, None
    damage = None
    try:
        for member in tar:
            if not member.isfile():
                continue
            member_key, ext = split_member_name(member.name)
            if member_key != key:
                if sample is not None:
                    pending.discard(position)
                    yield position, sample
                position, key, sample = position + 1, member_key, None
                if position > last:
                    break
                if position in pending:
                    sample = RawSample(shard, member_key)
            if sample is not None and ext in fields:
                sample.fields[ext] = _read_member(tar, member)
        else:  # tarfile ends quietly at a header cut short: a tar that ends early was cut
            cut = position + 1 < expected_count
            complete = sample is not None and all(f in sample.fields for f in fields)
            if sample is not None and (complete or not cut):  # an intact tar's incomplete sample: a bad sample
                pending.discard(position)
                yield position, sample
            if cut:  # (a sample this slot did not read counts as incomplete: its data was not looked at)
                ends = position + 1 if complete else max(position, 0)
                damage = ShardDamage(shard, ends, expected_count, f"the tar ends after {ends} complete samples")
    except (tarfile.TarError, OSError, EOFError) as exc:
        complete = sample is not None and all(f in sample.fields for f in fields)
        if complete:  # its members were all read; the next header is what failed
            pending.discard(position)
            yield position, sample
        cause = " ".join(str(exc).split()) or type(exc).__name__
        damage = ShardDamage(shard, max(position + complete, 0), expected_count, cause)
    if pending:
        damage = damage or ShardDamage(shard, min(pending), expected_count, "ended before the wanted samples")
        for missing in sorted(pending):
            yield missing, damage


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:
        return b""
    data = handle.read()
    if len(data) != member.size:
        raise EOFError(f"member {member.name} truncated ({len(data)} of {member.size} bytes)")
    return data

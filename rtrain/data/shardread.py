"""Samples out of one shard's tar: group members by key, read only the positions a slot needs.

Members belong to the same sample while their key (the path up to the first dot of the file name, as in
webdataset) stays the same; a sample's position is its index in the shard. Members of positions nobody
needs are never read (a seekable tar steps over their data), which is how a resumed run skips the samples
it already consumed without reading or decoding them.

Local shard files are walked by a small header reader of our own (ustar, GNU long names, pax path/size
records): Python's tarfile builds a TarInfo per member at about 60 microseconds each, 8 % of an
ImageNet-sized sample's decode. It ends where tarfile ends (a cut or invalid header after the first
member, two zero blocks) so damaged shards read the same either way; streams and object-store files go
through tarfile.

Shards may come from anywhere, so the reader trusts no header field: every size is non-negative and within
the bytes left in the file before anything is read or sought, long names and pax records are capped and each
pax record must advance and parse, and every header moves the position forward. A header that breaks one of
these rules is a tarfile.ReadError naming the byte offset, which read_positions turns into ShardDamage (handled
by the recipe's data.on_bad_sample like any damaged shard): it can neither loop nor allocate what it claims.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Callable, Iterator
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
        for name, read in _file_members(tar):
            member_key, ext = split_member_name(name)
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
                sample.fields[ext] = read()
        else:  # tarfile ends quietly at a header cut short: a tar that ends early was cut
            cut = position + 1 < expected_count
            complete = sample is not None and all(f in sample.fields for f in fields)
            if sample is not None and (complete or not cut):  # an intact tar's incomplete sample: a bad sample
                pending.discard(position)
                yield position, sample
            if cut:  # (a sample this slot did not read counts as incomplete: its data was not looked at)
                ends = position + 1 if complete else max(position, 0)
                damage = ShardDamage(shard, ends, expected_count, f"the tar ends after {ends} complete samples")
    # tarfile itself (streams, object-store files) lets ValueError/OverflowError/MemoryError out of some lying
    # headers (sparse maps, 4300+-digit numbers, huge long names): damage as well.
    except (tarfile.TarError, OSError, EOFError, ValueError, OverflowError, MemoryError) as exc:
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
    _check_member_size(member.name, member.size)
    handle = tar.extractfile(member)
    if handle is None:
        return b""
    data = handle.read()
    if len(data) != member.size:
        raise EOFError(f"member {member.name} truncated ({len(data)} of {member.size} bytes)")
    return data


Member = tuple[str, Callable[[], bytes]]  # (name, read its data: call at most once, before the next member)


def _file_members(tar: tarfile.TarFile) -> Iterator[Member]:
    """The regular-file members of the tar in order."""
    if isinstance(tar.fileobj, io.BufferedReader) and tar.mode == "r":  # a local file opened "r:"
        yield from _local_members(tar.fileobj)
        return
    for member in tar:
        if member.isfile():
            yield member.name, lambda member=member: _read_member(tar, member)


BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")  # regular files (and contiguous ones); directories, links, pax globals: skipped
MAX_LONG_NAME = 4096  # bytes of a GNU long name (PATH_MAX)
MAX_MEMBER_BYTES = 256 << 20  # one field of one sample, read into memory whole (ImageNet's largest JPEG: <1 MB)
MAX_PAX_RECORDS = 64 * 1024  # bytes of one member's pax records (path, size, times: a few hundred in practice)


def _octal(field: bytes, at: int) -> int:
    """A numeric header field: octal text, or GNU base-256 (first byte 0x80 positive, 0xff negative)."""
    if field[:1] and field[0] & 0x80:  # GNU base-256, for members of 8 GiB and more
        return int.from_bytes(field, "big", signed=True) if field[0] == 0xFF else int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise tarfile.ReadError(f"header at byte {at}: size field {text[:12]!r} is not a number") from None


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].split(b"\0", 1)[0].strip()
    try:
        expected = int(stored, 8)
    except ValueError:
        return False
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32  # the checksum field counts as eight spaces
    return expected == unsigned or expected == unsigned - 256 * sum(b > 127 for b in header)


def _pax_records(data: bytes, header_at: int) -> dict[str, str]:
    """`<length> <key>=<value>\\n` records; each must lie whole inside `data` (so every one advances)."""
    records, at = {}, 0
    while at < len(data) and data[at]:  # tarfile pads the records' block with NULs
        length_text, space, _ = data[at:at + 20].partition(b" ")
        length = int(length_text) if space and length_text.isdigit() else 0
        record = data[at:at + length]
        if length <= len(length_text) + 1 or at + length > len(data) or not record.endswith(b"\n") \
                or b"=" not in record:
            raise tarfile.ReadError(f"pax header at byte {header_at}: malformed record at its byte {at}")
        key, _, value = record[len(length_text) + 1:-1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        at += length
    return records


def _pax_size(pax: dict[str, str], header_at: int) -> int | None:
    if "size" not in pax:
        return None
    text = pax["size"]
    if not (text.isascii() and text.isdigit() and len(text) <= 20):
        raise tarfile.ReadError(f"pax header before byte {header_at}: size {text[:20]!r} is not a size")
    return int(text)


def _file_size(fileobj: io.BufferedReader) -> int:
    at = fileobj.tell()
    end = fileobj.seek(0, io.SEEK_END)
    fileobj.seek(at)
    return end


def _local_members(fileobj: io.BufferedReader) -> Iterator[Member]:
    fileobj.seek(0)
    end = _file_size(fileobj)
    offset, long_name, pax = 0, None, {}
    while True:
        header_at = offset
        header = fileobj.read(BLOCK)
        if len(header) < BLOCK or header.count(0) == BLOCK:
            return  # a header cut short or the end-of-archive blocks: where tarfile stops too
        if not _checksum_ok(header):
            if offset == 0:
                raise tarfile.ReadError("bad checksum")
            return  # tarfile ends quietly at an invalid header after the first member
        size, kind = _octal(header[124:136], header_at), header[156:157]
        data_at = header_at + BLOCK
        if kind in (b"L", b"x"):  # a GNU long name or pax records for the next member
            cap = MAX_LONG_NAME if kind == b"L" else MAX_PAX_RECORDS
            if not 0 <= size <= min(cap, end - data_at):
                raise tarfile.ReadError(f"header at byte {header_at}: {'long name' if kind == b'L' else 'pax'} "
                                        f"of {size} bytes (at most {cap}, {max(end - data_at, 0)} left)")
            extra = fileobj.read(size)
            if kind == b"L":
                long_name = extra.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                pax = _pax_records(extra, header_at)
            offset = data_at + -(-size // BLOCK) * BLOCK
            fileobj.seek(offset)
            continue
        name = header[0:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        name_text = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
        name_text = pax.get("path", long_name or name_text)
        pax_size = _pax_size(pax, header_at)
        size = size if pax_size is None else pax_size
        if size < 0:
            raise tarfile.ReadError(f"header at byte {header_at}: negative size {size}")
        if size > MAX_MEMBER_BYTES and kind not in _FILE_TYPES or size > end + MAX_MEMBER_BYTES:
            # a member never read (or beyond any file) still must not send the reader past sense
            raise tarfile.ReadError(f"header at byte {header_at}: size {size:,} (the shard has {end:,} bytes)")
        offset = data_at + -(-size // BLOCK) * BLOCK  # > header_at: every header moves forward
        long_name, pax = None, {}
        if kind in _FILE_TYPES:
            left = max(end - data_at, 0)
            yield name_text, lambda name=name_text, size=size, left=left: _read_exact(fileobj, name, size, left)
        fileobj.seek(offset)


def _check_member_size(name: str, size: int) -> None:
    if size > MAX_MEMBER_BYTES:
        raise tarfile.ReadError(f"member {name[:200]} claims {size:,} bytes, over the {MAX_MEMBER_BYTES >> 20} MiB "
                                "a sample's field may have")


def _read_exact(fileobj: io.BufferedReader, name: str, size: int, left: int) -> bytes:
    """The member's data; never more than the file holds, whatever its header claims."""
    _check_member_size(name, size)
    data = fileobj.read(min(size, left))
    if len(data) != size:
        raise EOFError(f"member {name} truncated ({len(data)} of {size} bytes)")
    return data

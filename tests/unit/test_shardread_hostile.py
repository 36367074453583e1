"""Shards whose tar headers lie cannot hang or blow up a reader: a zero-length or overlong pax record, a negative
or non-numeric pax size, a base-256 size of 2^80 or a negative one, a GNU long name claiming 8 GiB. Each ends
as ShardDamage naming the shard (the samples before it delivered), through rtrain's own header reader (local
shards) and through tarfile (streams), within seconds; and randomly damaged headers (hypothesis) always end
in samples or damage for every wanted position, never in an exception or a loop. Manifests are data, not
directions: entries that lie are refused by name, and a shard_root outside data.source needs the recipe's
data.allowed_shard_roots."""

from __future__ import annotations

import io
import signal
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtrain.data.shardread import RawSample, ShardDamage, read_positions

FIELDS = ("jpg", "cls")
SECONDS = 10  # far above what reading a few KiB takes; a loop or a huge allocation would pass it


def _checksummed(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def member(name: str, data: bytes, *, kind: bytes = b"0", size_field: bytes | None = None) -> bytes:
    """One tar member as written by tarfile (ustar), with its type and size field replaceable."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    header[156:157] = kind
    if size_field is not None:
        header[124:136] = size_field
    return _checksummed(header) + data + b"\0" * (-len(data) % 512)


def pax(records: bytes, **kwargs) -> bytes:
    return member("././@PaxHeader", records, kind=b"x", **kwargs)


def sample(key: str, label: int = 1) -> bytes:
    return member(f"{key}.jpg", b"\xff\xd8jpeg" * 20) + member(f"{key}.cls", str(label).encode())


END = b"\0" * 1024
GOOD = sample("s000000")

HOSTILE = {
    "pax record of length 0": pax(b"0 path=x\n"),
    "pax record longer than its header": pax(b"99 path=x\n"),
    "pax record that is not one": pax(b"hello world\n"),
    "negative pax size": pax(b"15 size=-10000\n"),
    "non-numeric pax size": pax(b"13 size=abcd\n"),
    "base-256 size of 2^80": member("s000001.jpg", b"", size_field=b"\x80" + (2**80).to_bytes(11, "big")),
    "negative base-256 size": member("s000001.jpg", b"", size_field=(-4096).to_bytes(12, "big", signed=True)),
    "non-numeric size": member("s000001.jpg", b"", size_field=b"12345678zzz\0"),
    "GNU long name of 8 GiB": member("././@LongLink", b"", kind=b"L",
                                     size_field=b"\x80" + (8 << 30).to_bytes(11, "big")),
    "pax records of 1 GiB": pax(b"", size_field=b"%011o\0" % (1 << 30)),
    # found by a review that tried to break the reader: a 5000-digit pax size (int() refuses it) and a member
    # that is never read but claims 2^80 bytes (a seek past any offset)
    "pax size of 5000 digits": pax(b"5011 size=" + b"9" * 5000 + b"\n"),
    "unread member of 2^80 bytes": member("s000001.txt", b"", size_field=b"\x80" + (2**80).to_bytes(11, "big")),
}


TARFILE_STREAM_HANGS = {"unread member of 2^80 bytes"}


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def expired(signum, frame):
        raise AssertionError(f"still reading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def read_all(tar: tarfile.TarFile, count: int) -> dict[int, RawSample | ShardDamage]:
    with deadline(SECONDS):
        return dict(read_positions(tar, "s.tar", set(range(count)), count, FIELDS))


def read_local(path: Path, count: int) -> dict[int, RawSample | ShardDamage]:
    return read_opened(lambda: tarfile.open(path, "r:"), count)


def read_stream(data: bytes, count: int) -> dict[int, RawSample | ShardDamage]:
    return read_opened(lambda: tarfile.open(fileobj=io.BytesIO(data), mode="r|"), count)


def read_opened(open_tar, count: int) -> dict[int, RawSample | ShardDamage]:
    """Every position read from the tar; {} when it does not open (rtrain.data.sources makes that a
    ShardError naming the shard, before any sample is read)."""
    try:
        tar = open_tar()
    except tarfile.TarError:
        return {}
    with tar:
        return read_all(tar, count)


@pytest.mark.parametrize("lie", list(HOSTILE), ids=list(HOSTILE))
def test_a_lying_header_is_damage_after_the_good_samples(tmp_path: Path, lie: str) -> None:
    data = GOOD + HOSTILE[lie] + sample("s000001") + sample("s000002") + END
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    ours = read_local(path, 3)
    # Python 3.11's tarfile, which reads HTTP streams, skips an unread member by reading forward block by block
    # for as long as its header claims (2^80 bytes: for ever); there only data.loader_timeout_s bounds it.
    streamed = ours if lie in TARFILE_STREAM_HANGS else read_stream(data, 3)
    for got in (ours, streamed):
        assert set(got) == {0, 1, 2}
        assert isinstance(got[0], RawSample) and got[0].fields["cls"] == b"1"  # what came before is delivered
        assert all(isinstance(item, (RawSample, ShardDamage)) for item in got.values())
    # rtrain's reader takes no lying header at its word (tarfile may skip one it cannot parse)
    damaged = [item for item in ours.values() if isinstance(item, ShardDamage)]
    assert damaged, f"{lie}: read as intact"
    assert damaged[0].message.startswith("shard s.tar: damaged from sample 1 of 3: ")


def test_local_damage_names_the_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    path.write_bytes(GOOD + HOSTILE["negative pax size"] + sample("s000001") + END)
    got = read_local(path, 2)
    assert isinstance(got[1], ShardDamage)
    assert f"at byte {len(GOOD)}" in got[1].message or f"before byte {len(GOOD) + 1024}" in got[1].message


SHARD = GOOD + sample("s000001", 2) + sample("s000002", 3) + END
HEADERS = [offset for offset in range(0, len(SHARD) - len(END), 512)
           if SHARD[offset + 257:offset + 262] == b"ustar"]


@settings(max_examples=150, deadline=None, derandomize=True,  # the same examples on every run (CI)
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.sampled_from(HEADERS), at=st.integers(0, 511), junk=st.binary(min_size=1, max_size=16),
       fix_checksum=st.booleans())
def test_any_damaged_header_ends_in_samples_or_damage(tmp_path: Path, header: int, at: int, junk: bytes,
                                                        fix_checksum: bool) -> None:
    data = bytearray(SHARD)
    data[header + at:header + at + len(junk)] = junk[:512 - at]
    if fix_checksum:  # past the checksum test: the fields themselves are what is hostile
        data[header:header + 512] = _checksummed(bytearray(data[header:header + 512]))
    path = tmp_path / "fuzz.tar"
    path.write_bytes(bytes(data))
    for got in (read_local(path, 3), read_stream(bytes(data), 3)):
        assert not got or set(got) == {0, 1, 2}
        assert all(isinstance(item, (RawSample, ShardDamage)) for item in got.values())


def _manifest(shards: list[dict], **extra) -> dict:
    return {"version": 2, "split": "train", "shards": shards, "classes": {"a": 0}, **extra}


GOOD_ENTRY = {"name": "train-000000.tar", "count": 3, "bytes": 10240, "sha256": "0" * 64}


@pytest.mark.parametrize("change,why", [
    ({"name": "/etc/passwd"}, "plain relative path"), ({"name": "../../elsewhere.tar"}, "plain relative path"),
    ({"name": "s3://other-bucket/x.tar"}, "plain relative path"), ({"name": "a/./b.tar"}, "plain relative path"),
    ({"count": 10**12}, "cannot fit"), ({"count": -1}, "not a count"), ({"bytes": "many"}, "not a count"),
    ({"sha256": "not hex"}, "not a hex digest"),
])
def test_a_manifest_entry_that_lies_is_refused_by_name(change: dict, why: str) -> None:
    from rtrain.data.format import Manifest

    with pytest.raises(ValueError, match=rf"m.json: not a valid rtrain manifest .*shards\[0\].*{why}"):
        Manifest.from_dict(_manifest([{**GOOD_ENTRY, **change}]), where="m.json")
    assert Manifest.from_dict(_manifest([GOOD_ENTRY, {**GOOD_ENTRY, "name": "sub/dir/x.tar"}])).num_samples == 6


@pytest.mark.parametrize("root", ["/srv/elsewhere", "../../outside", "s3://another-bucket/p"])
def test_a_shard_root_outside_the_source_needs_the_recipe_s_word(tmp_path: Path, root: str) -> None:
    import json

    from rtrain.data.sources import ShardSource

    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "manifest.json").write_text(json.dumps(_manifest([GOOD_ENTRY], shard_root=root)))
    with pytest.raises(ValueError, match=r"outside data.source .* data.allowed_shard_roots"):
        ShardSource(str(tmp_path / "data"), "train").read_manifest()
    resolved = str(tmp_path) + "/outside" if root.startswith("..") else root
    allowed = ShardSource(str(tmp_path / "data"), "train", allowed_roots=[resolved])
    allowed.read_manifest()
    assert allowed.shard_root == resolved
    (tmp_path / "data" / "train" / "manifest.json").write_text(json.dumps(_manifest([GOOD_ENTRY],
                                                                                    shard_root="../mirror")))
    inside = ShardSource(str(tmp_path / "data"), "train")
    inside.read_manifest()  # ../mirror from data/train/ is data/mirror: inside data.source
    assert inside.shard_root == str(tmp_path / "data" / "mirror")


@pytest.mark.parametrize("text", ["null", "[]", '"x"', '{"version": 1e400, "split": "t", "shards": [], "classes": {}}',
                                  '{"version": 2, "split": "t", "shards": [], "classes": null}', "[" * 50000 + "]" * 50000])
def test_a_manifest_that_is_not_one_is_a_value_error(text: str) -> None:
    from rtrain.data.format import Manifest

    with pytest.raises(ValueError, match="m.json"):
        Manifest.loads(text, where="m.json")


def test_a_shard_root_cannot_leave_the_source_through_a_symlink_or_percent_escapes(tmp_path: Path) -> None:
    import json

    from rtrain.data.sources import ShardSource

    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (tmp_path / "data" / "train" / "out").symlink_to(tmp_path / "secret")  # inside by name, outside in fact
    manifest = tmp_path / "data" / "train" / "manifest.json"
    manifest.write_text(json.dumps(_manifest([GOOD_ENTRY], shard_root="out")))
    with pytest.raises(ValueError, match=r"shard_root 'out' .* outside data.source"):
        ShardSource(str(tmp_path / "data"), "train").read_manifest()
    ShardSource(str(tmp_path / "data"), "train", allowed_roots=[str(tmp_path / "secret")]).read_manifest()
    (tmp_path / "data" / "train" / "real").mkdir()
    manifest.write_text(json.dumps(_manifest([GOOD_ENTRY], shard_root="real")))
    ShardSource(str(tmp_path / "data"), "train").read_manifest()  # a real folder inside: fine

    source = ShardSource("http://127.0.0.1:9/data", "train")
    for root, escapes in (("%2e%2e/%2E%2E/other", True), ("..%2fother", False), ("sub%20dir", False)):
        checked = source._root_views(f"http://127.0.0.1:9/data/train/{root}", root)
        inside = all(any(seen == b or seen.startswith(b + "/") for b in bases) for seen, bases in checked)
        assert inside is not escapes, (root, checked)

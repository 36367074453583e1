"""Shard bytes are deterministic and readable by tarfile and webdataset (data_prep.shards)."""

import io
import tarfile

import webdataset as wds

from data_prep.shards import DeterministicTarWriter


def _members():
    return [("n01440764_10026.cls", b"0"), ("n01440764_10026.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
            (f"{'k' * 120}.cls", b"7"), (f"{'k' * 120}.jpg", b"x" * 513)]


def test_writer_matches_tarfile_gnu_output_byte_for_byte():
    ours = io.BytesIO()
    writer = DeterministicTarWriter(ours)
    for name, payload in _members():
        writer.add(name, payload)
    writer.close()
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, payload in _members():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(payload), 0, 0o644, "", ""
            tar.addfile(info, io.BytesIO(payload))
    assert ours.getvalue() == reference.getvalue()
    assert len(ours.getvalue()) % tarfile.RECORDSIZE == 0


def test_webdataset_reads_the_samples(tmp_path):
    path = tmp_path / "s-000000.tar"
    with open(path, "wb") as f:
        writer = DeterministicTarWriter(f)
        for name, payload in _members():
            writer.add(name, payload)
        writer.close()
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["n01440764_10026", "k" * 120]
    assert samples[1]["cls"] == b"7" and samples[1]["jpg"] == b"x" * 513

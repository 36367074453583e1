"""rtrain's own tar header reader (local shards) sees exactly the members Python's tarfile sees: ustar names
with a prefix, GNU long names, pax path/size records, directories and links skipped; and it stops where
tarfile stops on a damaged or cut tar."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from rtrain.data import shardread


def _write(path: Path, fmt: int, names: list[str]) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        directory = tarfile.TarInfo("d")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for index, name in enumerate(names):
            payload = bytes([index % 251]) * (700 * index + 3)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("a-link")
        link.type = tarfile.SYMTYPE
        link.linkname = names[0]
        tar.addfile(link)


def _both(path: Path) -> tuple[list, list]:
    with tarfile.open(path, "r:") as tar:
        ours = [(name, read()) for name, read in shardread._local_members(tar.fileobj)]
    with tarfile.open(path, "r:") as tar:
        theirs = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    return ours, theirs


NAMES = ["k0.jpg", "k0.cls", "sub/" + "x" * 120 + ".jpg", "p" * 90 + "/" + "q" * 60 + ".cls", "ünï.jpg"]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_and_bytes_match_tarfile(tmp_path: Path, fmt: int) -> None:
    names = [n for n in NAMES if fmt != tarfile.USTAR_FORMAT or len(n.split("/")[-1]) <= 100]
    path = tmp_path / "s.tar"
    _write(path, fmt, names)
    ours, theirs = _both(path)
    assert ours == theirs and [n for n, _ in ours] == names


def test_a_cut_or_overwritten_tar_ends_where_tarfile_ends(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    _write(path, tarfile.PAX_FORMAT, [f"k{i}.jpg" for i in range(6)])
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:len(data) // 2 + 100])
    with tarfile.open(cut, "r:") as tar:
        names = []
        with pytest.raises(EOFError, match="truncated"):
            for name, read in shardread._local_members(tar.fileobj):
                names.append(name)
                read()
    with tarfile.open(path, "r:") as tar:
        third = [m for m in tar if m.isfile()][2].offset  # a pax member: its extended header comes first
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(data[:third] + b"\x17" * 512 + data[third + 512:])
    ours, theirs = _both(garbage)
    assert ours == theirs and 0 < len(ours) < 6

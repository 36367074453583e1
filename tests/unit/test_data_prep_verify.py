"""`python -m data_prep.verify` catches damaged shards and names them (data_prep.verify)."""

import io
import shutil
import tarfile

import pytest

from data_prep.imagenet import build_parser, run
from data_prep.parallel import run_shard_jobs_in_process
from data_prep.synthetic import SyntheticSpec, write_synthetic
from data_prep.verify import main
from rtrain.data.format import MANIFEST_NAME, Manifest, ShardEntry, sha256_file


@pytest.fixture(scope="module")
def clean_out(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("out")
    write_synthetic(src, SyntheticSpec(classes=2, per_class=5, val_per_class=2, image_size=(64, 48)))
    run(build_parser().parse_args(["--src", str(src), "--out", str(out), "--shard-size", "3"]), run_shard_jobs_in_process)
    return out


@pytest.fixture()
def out(clean_out, tmp_path):
    shutil.copytree(clean_out, tmp_path / "out")
    return tmp_path / "out"


def _shard(out, index=1):
    return out / "train" / Manifest.load(out / "train" / MANIFEST_NAME).shards[index].name


def test_clean_output_verifies(out, capsys):
    assert main([str(out)]) == 0
    assert main([str(out / "val"), "--workers", "2"]) == 0
    assert "OK" in capsys.readouterr().out


def test_flipped_byte_is_caught(out, capsys):
    shard = _shard(out)
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main([str(out)]) == 1
    captured = capsys.readouterr()
    assert shard.name in captured.err and "sha256" in captured.out


def test_truncated_shard_is_caught(out, capsys):
    shard = _shard(out, 0)
    shard.write_bytes(shard.read_bytes()[:5000])
    assert main([str(out)]) == 1
    assert shard.name in capsys.readouterr().err


def test_missing_shard_is_caught(out, capsys):
    _shard(out, 2).unlink()
    assert main([str(out)]) == 1
    assert "missing" in capsys.readouterr().out


def test_undecodable_jpg_is_caught_even_when_checksums_match(out, capsys):
    """A shard written by something else: consistent manifest, but a truncated image inside."""
    shard = _shard(out)
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for member, payload in members:
            payload = payload[: len(payload) // 2] if member.name.endswith(".jpg") else payload
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    manifest = Manifest.load(out / "train" / MANIFEST_NAME)
    manifest.shards[1] = ShardEntry(shard.name, manifest.shards[1].count, shard.stat().st_size, sha256_file(shard))
    (out / "train" / MANIFEST_NAME).write_text(manifest.to_json())
    assert main([str(out)]) == 1
    captured = capsys.readouterr()
    assert shard.name in captured.err and "truncated JPEG" in captured.out


def test_not_an_output_folder_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert MANIFEST_NAME in capsys.readouterr().err

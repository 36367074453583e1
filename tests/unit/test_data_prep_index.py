"""data_prep.index on shards that webdataset's writers made (other key names, other folders), then the
train loader on them unchanged; bad samples are refused with one line naming the shard and the key."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_loader_fixtures import small_cfg
from wds_samples import (assert_labels_match_images, read_epoch, write_with_shardwriter,
                         write_with_tarwriter)

from data_prep.index import main as index_main
from data_prep.verify import verify_split
from rtrain.data.format import Manifest, SampleKeys, sha256_file


def _index(*args: str) -> int:
    return index_main([str(a) for a in args])


def test_shardwriter_jpg_cls_shards_index_in_place_and_train(tmp_path: Path, capsys) -> None:
    shards = write_with_shardwriter(tmp_path / "out" / "train", 26, per_shard=10)
    assert _index(tmp_path / "out" / "train", "--out", tmp_path / "out") == 0
    manifest = Manifest.load(tmp_path / "out" / "train" / "manifest.json")
    assert manifest.format_version == 1 and manifest.shard_root is None  # plain jpg/cls beside the manifest
    assert [s.count for s in manifest.shards] == [10, 10, 6]
    assert [s.sha256 for s in manifest.shards] == [sha256_file(p) for p in shards]
    assert [s.bytes for s in manifest.shards] == [p.stat().st_size for p in shards]
    assert manifest.classes == {str(i): i for i in range(26)}
    labels, levels = read_epoch(small_cfg(tmp_path / "out"))
    assert sorted(labels) == list(range(26))
    assert_labels_match_images(labels, levels)
    train_labels, _ = read_epoch(small_cfg(tmp_path / "out"), train=True)
    assert len(train_labels) == 24 and len(set(train_labels)) == 24  # 6 batches of 4, each sample once
    assert "3 shards, 26 samples, 26 classes" in capsys.readouterr().out


@pytest.mark.parametrize("style,keys", [("png_json", SampleKeys("png", "json", "label")),
                                        ("jpeg_clstxt", SampleKeys("jpeg", "cls.txt"))])
def test_other_key_names_in_a_read_only_mirror(tmp_path: Path, style: str, keys: SampleKeys) -> None:
    mirror = tmp_path / "mirror" / "sub"
    write_with_tarwriter(mirror / "a" / "x-0.tar", range(0, 7), style)
    write_with_tarwriter(mirror / "b" / "x-1.tar", range(7, 13), style)
    for path in mirror.rglob("*.tar"):
        path.chmod(0o444)
    assert _index(f"{mirror}/{{a/x-0,b/x-1}}.tar", "--out", tmp_path / "idx", "--split", "val") == 0
    manifest = Manifest.load(tmp_path / "idx" / "val" / "manifest.json")
    assert manifest.keys == keys and manifest.format_version == 2
    assert manifest.shard_root == str(mirror) and [s.name for s in manifest.shards] == ["a/x-0.tar", "b/x-1.tar"]
    with pytest.raises(ValueError, match=r"shard_root .* outside data.source .* data.allowed_shard_roots"):
        read_epoch(small_cfg(tmp_path / "idx"), split="val")  # a manifest does not send the loader elsewhere
    labels, levels = read_epoch(small_cfg(tmp_path / "idx", allowed_shard_roots=[str(mirror)]), split="val")
    assert sorted(labels) == list(range(13))
    assert_labels_match_images(labels, levels)
    assert verify_split(tmp_path / "idx" / "val") == []  # data_prep.verify re-checks against the same keys


def test_classes_file_of_wnids_and_relative_shard_root(tmp_path: Path) -> None:
    write_with_tarwriter(tmp_path / "shards" / "s-0.tar", range(0, 10), "jpeg_clstxt")
    wnids = tmp_path / "wnids.txt"
    wnids.write_text("".join(f"n{i:08d} class {i}, a name\n" for i in range(12)))
    assert _index(tmp_path / "shards", "--out", tmp_path / "idx", "--classes", wnids) == 0
    manifest_path = tmp_path / "idx" / "train" / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    assert list(raw["classes"])[:2] == ["n00000000", "n00000001"] and len(raw["classes"]) == 12
    raw["shard_root"] = "../../shards"  # relative to the manifest's folder: moves with both
    manifest_path.write_text(json.dumps(raw))
    labels, levels = read_epoch(small_cfg(tmp_path / "idx", allowed_shard_roots=[str(tmp_path / "shards")]))
    assert sorted(labels) == list(range(10))
    assert_labels_match_images(labels, levels)


def _only_problem(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("BAD ")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("fault,style,message", [
    ("corrupt", "png_json", r"sample 'png_json00004': image does not decode: .* \(key png\)$"),
    ("corrupt", "jpeg_clstxt",
     r"sample 'jpeg_clstxt00004': image does not decode: (corrupt|truncated) JPEG .*\(key jpeg\)$"),
    ("no_label", "png_json", r"sample 'png_json00004': no json member \(key json\)$"),
])
def test_bad_sample_is_one_line_naming_shard_and_key(tmp_path: Path, capsys, fault, style, message) -> None:
    shard = write_with_tarwriter(tmp_path / "in" / "s-0.tar", range(8), style, broken={4: fault})
    assert _index(tmp_path / "in", "--out", tmp_path / "idx") == 1
    line = _only_problem(capsys)
    assert line.startswith(f"BAD {shard}: ")
    assert re.search(message, line), line
    assert not (tmp_path / "idx" / "train" / "manifest.json").exists()


def test_label_out_of_range_of_the_classes_file(tmp_path: Path, capsys) -> None:
    shard = write_with_tarwriter(tmp_path / "in" / "s-0.tar", range(12), "jpeg_clstxt")
    (tmp_path / "classes.txt").write_text("".join(f"c{i}\n" for i in range(10)))
    assert _index(tmp_path / "in", "--out", tmp_path / "idx", "--classes", tmp_path / "classes.txt") == 1
    err = capsys.readouterr().err
    assert f"BAD {shard}: sample 'jpeg_clstxt00010': label 10 outside 0..9 (key cls.txt)" in err
    assert f"BAD {shard}: sample 'jpeg_clstxt00011': label 11 outside 0..9 (key cls.txt)" in err


def test_undetectable_keys_and_missing_input_are_named(tmp_path: Path, capsys) -> None:
    write_with_tarwriter(tmp_path / "in" / "s-0.tar", range(1), "png_json")
    assert _index(tmp_path / "in", "--out", tmp_path / "idx", "--image-key", "jpg", "--label-key", "json") == 1
    assert "no jpg member (key jpg)" in _only_problem(capsys)
    assert _index(tmp_path / "nothing", "--out", tmp_path / "idx") == 2
    assert capsys.readouterr().err.strip() == f"data_prep.index: error: {tmp_path / 'nothing'}: no such folder"

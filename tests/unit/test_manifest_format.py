"""Manifest versions 1 and 2: old manifests load with today's defaults; keys and shard_root round-trip."""

from __future__ import annotations

import json

import pytest

from rtrain.data.format import Manifest, SampleKeys, ShardEntry, decode_label, resolve_shard_root

V1 = {"version": 1, "split": "train", "classes": {"a": 0, "b": 1},
      "shards": [{"name": "train-000000.tar", "count": 2, "bytes": 10240, "sha256": "0" * 64}]}


def test_version_1_manifest_loads_with_jpg_cls_beside_it() -> None:
    manifest = Manifest.loads(json.dumps(V1))
    assert manifest.keys == SampleKeys("jpg", "cls", None) and manifest.shard_root is None
    assert json.loads(manifest.to_json())["version"] == 1  # still readable by an older rtrain


def test_version_2_round_trips_keys_and_root() -> None:
    manifest = Manifest("val", [ShardEntry("a/x.tar", 1, 10240, "0" * 64)], {"0": 0},
                        keys=SampleKeys("webp", "json", "label"), shard_root="s3://bucket/mirror")
    again = Manifest.loads(manifest.to_json())
    assert again.format_version == 2 and json.loads(manifest.to_json())["version"] == 2
    assert again.keys == manifest.keys and again.shard_root == "s3://bucket/mirror"


def test_unknown_version_and_json_label_without_field_are_refused() -> None:
    with pytest.raises(ValueError, match="version 3"):
        Manifest.loads(json.dumps({**V1, "version": 3}))
    with pytest.raises(ValueError, match="label_field must name"):
        Manifest.loads(json.dumps({**V1, "version": 2, "keys": {"image": "png", "label": "json"}}))


@pytest.mark.parametrize("base,root,expected", [
    ("/data/idx/train", None, "/data/idx/train"),
    ("/data/idx/train", "/mirror/in1k/", "/mirror/in1k"),
    ("/data/idx/train", "../../mirror", "/data/mirror"),
    ("s3://b/idx/train", "../shards/train", "s3://b/idx/shards/train"),
    ("/data/idx/train", "https://host/wds", "https://host/wds"),
])
def test_shard_root_resolution(base: str, root: str | None, expected: str) -> None:
    assert resolve_shard_root(base, root) == expected


@pytest.mark.parametrize("raw,keys,expected", [
    (b"7", SampleKeys(), 7), (b" 3\n", SampleKeys("png", "cls.txt"), 3),
    (b'{"label": 2, "x": 1}', SampleKeys("jpg", "json", "label"), 2),
    (b'{"wnid": "n02"}', SampleKeys("jpg", "json", "wnid"), 1),
])
def test_labels_decode_from_ascii_json_and_names(raw: bytes, keys: SampleKeys, expected: int) -> None:
    assert decode_label(raw, keys, {"n01": 0, "n02": 1}) == expected


@pytest.mark.parametrize("raw,keys,message", [
    (b'{"y": 2}', SampleKeys("jpg", "json", "label"), "no field 'label'"),
    (b"n09", SampleKeys(), "class name 'n09' is not in the manifest's classes"),
    (b"\xff", SampleKeys(), "is not ASCII"),
])
def test_bad_labels_say_why(raw: bytes, keys: SampleKeys, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_label(raw, keys, {"n01": 0})

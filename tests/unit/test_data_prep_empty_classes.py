"""An empty class folder is never a class without a word: it is left out and reported, or kept on request
(`--keep-empty-classes`, stable indices); the manifest lists it either way. Real folder trees, run in-process."""

from __future__ import annotations

import shutil

import pytest

from data_prep.imagenet import build_parser, main, run
from data_prep.parallel import run_shard_jobs_in_process
from data_prep.report import format_summary
from data_prep.shards import iter_samples
from data_prep.synthetic import SyntheticSpec, write_synthetic
from rtrain.data.format import MANIFEST_NAME, Manifest, decode_cls

SPEC = SyntheticSpec(classes=3, per_class=4, val_per_class=2, image_size=(48, 40))
EMPTY = "n00000001"


@pytest.fixture
def src(tmp_path):
    """Synthetic ImageNet folders whose middle class has no file left, in train and in val."""
    root = tmp_path / "src"
    write_synthetic(root, SPEC)
    for split in ("train", "val"):
        shutil.rmtree(root / split / EMPTY)
        (root / split / EMPTY).mkdir()
    return root


def _prep(src, out, *extra):
    args = build_parser().parse_args(["--src", str(src), "--out", str(out), "--shard-size", "4", *extra])
    return run(args, run_shard_jobs_in_process)


def _labels_by_class(split_dir) -> dict[str, set[int]]:
    """wnid (from the key) -> the labels its samples got."""
    manifest = Manifest.load(split_dir / MANIFEST_NAME)
    found: dict[str, set[int]] = {}
    for entry in manifest.shards:
        for key, fields in iter_samples(split_dir / entry.name):
            found.setdefault(key.split("_")[0], set()).add(decode_cls(fields["cls"]))
    return found


def test_empty_class_folder_is_left_out_and_reported(src, tmp_path):
    reports = _prep(src, tmp_path / "out")
    train = Manifest.load(tmp_path / "out" / "train" / MANIFEST_NAME)
    assert train.classes == {"n00000000": 0, "n00000002": 1}
    assert train.empty_classes == [EMPTY] and train.options["keep_empty_classes"] is False
    assert _labels_by_class(tmp_path / "out" / "train") == {"n00000000": {0}, "n00000002": {1}}
    summary = format_summary(reports)
    assert "== train (2 classes)" in summary
    assert any(line.split() == ["empty", "class", "folders", "1"] for line in summary.splitlines())
    assert any(line.split() == [EMPTY, "left", "out"] for line in summary.splitlines())


def test_keep_empty_classes_keeps_the_indices(src, tmp_path):
    reports = _prep(src, tmp_path / "out", "--keep-empty-classes")
    train = Manifest.load(tmp_path / "out" / "train" / MANIFEST_NAME)
    assert train.classes == {"n00000000": 0, EMPTY: 1, "n00000002": 2}
    assert train.empty_classes == [EMPTY] and train.options["keep_empty_classes"] is True
    assert _labels_by_class(tmp_path / "out" / "train") == {"n00000000": {0}, "n00000002": {2}}
    assert any(line.split()[:2] == [EMPTY, "kept"] for line in format_summary(reports).splitlines())


def test_manifests_without_empty_classes_do_not_mention_them(tmp_path):
    write_synthetic(tmp_path / "src", SPEC)
    _prep(tmp_path / "src", tmp_path / "out")
    assert "\"empty_classes\"" not in (tmp_path / "out" / "train" / MANIFEST_NAME).read_text()
    assert Manifest.load(tmp_path / "out" / "train" / MANIFEST_NAME).empty_classes == []


def test_val_images_of_a_left_out_class_are_one_line_naming_the_flag(src, tmp_path, capsys):
    (src / "val" / EMPTY / "ILSVRC2012_val_00009999.JPEG").write_bytes(
        next(p for p in (src / "val" / "n00000000").iterdir()).read_bytes())
    assert main(["--src", str(src), "--out", str(tmp_path / "out"), "--workers", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"val/{EMPTY}" in error and "--keep-empty-classes" in error

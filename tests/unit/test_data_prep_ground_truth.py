"""Every val ground-truth format maps the same files to the same wnids (data_prep.ground_truth)."""

import numpy as np
import pytest

from data_prep.ground_truth import detect_format, read_devkit_classes, read_val_labels
from data_prep.synthetic import SyntheticSpec, write_ground_truth_files, wnid

VAL = [(f"ILSVRC2012_val_{i:08d}.JPEG", cls) for i, cls in enumerate([2, 0, 1, 2, 1, 0], start=1)]
KEYS = [name.split(".")[0] for name, _ in VAL]
EXPECTED = {key: wnid(cls) for key, (_, cls) in zip(KEYS, VAL)}
FILES = {
    "kaggle": "LOC_val_solution.csv",
    "devkit": "ILSVRC2012_validation_ground_truth.txt",
    "pairs": "val_pairs.txt",
    "wnids": "imagenet_2012_validation_synset_labels.txt",
}


@pytest.fixture()
def gt_dir(tmp_path):
    write_ground_truth_files(tmp_path, VAL, SyntheticSpec(classes=3), np.random.default_rng(0))
    return tmp_path


@pytest.mark.parametrize("fmt", sorted(FILES))
def test_each_format_is_detected_and_read(gt_dir, fmt):
    path = gt_dir / FILES[fmt]
    assert detect_format(path, [l for l in path.read_text().splitlines() if l.strip()]) == fmt
    assert read_val_labels(path, KEYS) == EXPECTED
    assert read_val_labels(path, KEYS, fmt=fmt) == EXPECTED


def test_devkit_ids_follow_the_devkit_order_not_sorted_wnids(gt_dir):
    devkit = read_devkit_classes(gt_dir / "meta.mat")
    assert [devkit[i] for i in sorted(devkit)] != sorted(devkit.values())
    ids = [int(line) for line in (gt_dir / FILES["devkit"]).read_text().split()]
    # reading id k as sorted class k-1 (the classic bug) would give different labels
    naive = {key: wnid(i - 1) for key, i in zip(KEYS, ids)}
    assert naive != EXPECTED


def test_devkit_accepts_a_text_class_list(gt_dir, tmp_path):
    devkit = read_devkit_classes(gt_dir / "meta.mat")
    text = tmp_path / "devkit_classes.txt"
    text.write_text("".join(f"{devkit[i]} some words\n" for i in sorted(devkit)))
    assert read_val_labels(gt_dir / FILES["devkit"], KEYS, devkit_meta=text) == EXPECTED


def test_devkit_without_class_order_is_an_error_naming_the_file(gt_dir):
    (gt_dir / "meta.mat").unlink()
    with pytest.raises(ValueError, match="ILSVRC2012_validation_ground_truth.txt.*--devkit-meta"):
        read_val_labels(gt_dir / FILES["devkit"], KEYS)


def test_unlabeled_val_file_is_an_error_naming_it(gt_dir):
    with pytest.raises(ValueError, match="ILSVRC2012_val_00000099"):
        read_val_labels(gt_dir / FILES["kaggle"], KEYS + ["ILSVRC2012_val_00000099"])


def test_wnid_list_must_match_file_count(gt_dir):
    with pytest.raises(ValueError, match="one line per val file"):
        read_val_labels(gt_dir / FILES["wnids"], KEYS[:-1])


def test_unrecognised_file_is_an_error(tmp_path):
    bad = tmp_path / "labels.txt"
    bad.write_text("a b c\nd e f\n")
    with pytest.raises(ValueError, match="labels.txt.*format"):
        read_val_labels(bad, KEYS)

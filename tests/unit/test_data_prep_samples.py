"""`python -m data_prep.samples` writes usable ImageNet-style folders (data_prep.samples, .synthetic)."""

import json

import numpy as np
import pytest
from PIL import Image

from data_prep.samples import main, write_digits
from data_prep.synthetic import REALISTIC_SIZES, SyntheticSpec, synthetic_image, jpeg_bytes, write_synthetic


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    return root, write_digits(root, size=32, seed=0)


def _listing(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.JPEG"))


def test_digits_are_an_imagenet_folder_of_real_digits(digits_dir):
    root, counts = digits_dir
    assert counts["train"] + counts["val"] == 1797
    assert abs(counts["val"] - 0.2 * 1797) < 2
    for split in ("train", "val"):
        assert sorted(p.name for p in (root / split).iterdir()) == [f"digit{k}" for k in range(10)]
    image = Image.open(next((root / "val" / "digit3").iterdir()))
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
    assert np.asarray(image).std() > 20  # real strokes, not a flat image


def test_digits_split_is_deterministic(digits_dir, tmp_path):
    write_digits(tmp_path, size=8, seed=0)
    assert _listing(tmp_path) == _listing(digits_dir[0])


def test_synthetic_images_weigh_like_imagenet():
    rng = np.random.default_rng(0)
    sizes = [len(jpeg_bytes(synthetic_image(rng, 500, 375), 90)) for _ in range(6)]
    assert 60_000 < np.mean(sizes) < 160_000  # real ImageNet: mean 110 KB, median 105 KB
    assert (500, 375) in REALISTIC_SIZES


def test_synthetic_cli_writes_quirks_and_ground_truth(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["synthetic", "--out", str(out), "--classes", "2", "--per-class", "2", "--val-per-class", "2",
                 "--val-layout", "flat", "--image-size", "40x30"]) == 0
    quirks = json.loads((out / "quirks.json").read_text())
    assert {q["kind"] for q in quirks.values()} >= {"cmyk", "png_as_jpeg", "grayscale", "truncated", "zero_byte",
                                                    "text_file", "exif_rotated"}
    assert all((out / path).exists() for path in quirks)
    assert len(list((out / "val").glob("ILSVRC2012_val_*.JPEG"))) == 4
    for name in ("LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt", "meta.mat", "val_pairs.txt"):
        assert (out / name).is_file()
    assert main(["synthetic", "--out", str(out)]) == 2  # refuses a non-empty folder
    assert "not empty" in capsys.readouterr().err


def test_synthetic_is_reproducible(tmp_path):
    spec = SyntheticSpec(classes=2, per_class=2, val_per_class=1, image_size=(32, 24))
    write_synthetic(tmp_path / "a", spec)
    write_synthetic(tmp_path / "b", spec)
    for path in (tmp_path / "a").rglob("*.JPEG"):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()

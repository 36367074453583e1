"""data_prep.photos: real photos cut and re-encoded the way ImageNet's train files are (sizes, file sizes,
chroma subsampling, grayscale share), one class per photo, reproducible from the seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from data_prep.photos import bundled_photos, write_photos
from data_prep.samples import main as samples_main


def test_bundled_photos_are_real_photographs() -> None:
    photos = bundled_photos()
    assert len(photos) >= 12 and {"china", "flower", "astronaut", "coffee"} <= set(photos)
    assert all(min(p.size) >= 300 for p in photos.values())


def test_files_match_imagenet_statistics(tmp_path: Path) -> None:
    stats = write_photos(tmp_path / "p", 300, seed=3)
    files = sorted((tmp_path / "p" / "train").glob("*/*.JPEG"))
    assert stats.files == len(files) == 300
    assert 420 <= stats.mean_width <= 510 and 360 <= stats.mean_height <= 440  # ImageNet: 468 x 401
    assert 80 <= stats.mean_kb <= 150  # ImageNet: 110 KB
    assert 0.0 < stats.short_side_under_224 < 0.15  # ImageNet: 6.6 %
    modes, subsampling = [], []
    for path in files:
        with Image.open(path) as image:
            assert image.format == "JPEG" and not image.info.get("progressive")
            modes.append(image.mode)
            if image.mode == "RGB":
                subsampling.append(image.layer[0][1:3] == image.layer[1][1:3])  # 4:4:4: same sampling
    assert modes.count("L") / len(modes) < 0.1
    assert 0.6 < sum(subsampling) / len(subsampling) < 0.9  # ImageNet: 76 % 4:4:4
    assert len({p.parent.name for p in files}) >= 10  # one class per source photo


def test_reproducible_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def digest(root: Path) -> str:
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.JPEG")))).hexdigest()

    write_photos(tmp_path / "a", 20, seed=5, val_fraction=0.3)
    assert samples_main(["photos", "--out", str(tmp_path / "b"), "--count", "20", "--seed", "5",
                         "--val-fraction", "0.3"]) == 0
    assert "wrote 20 photos" in capsys.readouterr().out
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert any((tmp_path / "a" / "val").rglob("*.JPEG"))
    assert samples_main(["photos", "--out", str(tmp_path / "c"), "--count", "0"]) == 2

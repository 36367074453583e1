"""Synthetic ImageNet-like folders: realistic JPEG sizes, every real-world quirk, every ground-truth format.

Images mix smooth gradients, low-frequency blobs, shapes and sensor-like noise so that a 500x375 JPEG at
quality 90 weighs around 100 KB, like real ImageNet files (mean 110 KB). Classes are named ``n0000000x``.
Quirk files carry descriptive names (``n00000000_cmyk.JPEG``), since the real quirk files' names refer to
wnids a synthetic set does not have; ``quirks.json`` maps each quirk file to its kind and to where
data_prep must put it (``converted:<kind>``, ``kept:grayscale`` or ``quarantined``).

A flat val is named ``ILSVRC2012_val_{i:08d}.JPEG`` and comes with each ground-truth format:
``LOC_val_solution.csv``, ``ILSVRC2012_validation_ground_truth.txt`` + ``meta.mat`` (a devkit class order
that differs from the sorted one), ``val_pairs.txt`` and ``imagenet_2012_validation_synset_labels.txt``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REALISTIC_SIZES = ((500, 375), (500, 333), (375, 500), (500, 400), (333, 500), (320, 240))
TRAIN_QUIRKS = {  # kind -> expected fate in data_prep
    "cmyk": "converted:cmyk_to_rgb",
    "png_as_jpeg": "converted:png_to_jpeg",
    "grayscale": "kept:grayscale",
    "exif_rotated": "converted:exif_orientation",
    "truncated": "quarantined",
    "zero_byte": "quarantined",
    "text_file": "quarantined",
}
VAL_QUIRKS = {"cmyk": "converted:cmyk_to_rgb", "grayscale": "kept:grayscale"}
EXIF_ROTATE_90_CW = 6


@dataclass(frozen=True)
class SyntheticSpec:
    classes: int = 4
    per_class: int = 8
    val_per_class: int = 2
    seed: int = 0
    val_layout: str = "folders"
    image_size: tuple[int, int] | None = None  # None: realistic ImageNet mix
    quality: int = 90
    quirks: bool = True

    def __post_init__(self) -> None:
        if self.val_layout not in ("folders", "flat"):
            raise ValueError(f"val_layout must be 'folders' or 'flat', got {self.val_layout!r}")
        if self.classes < 1 or self.per_class < 0 or self.val_per_class < 0:
            raise ValueError(f"classes must be >= 1 and counts >= 0: {self}")


def wnid(index: int) -> str:
    return f"n{index:08d}"


def synthetic_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x / width + np.sin(angle) * y / height)[..., None]
    base = rng.uniform(40, 200, 3) + ramp * rng.uniform(-120, 120, 3)
    cell = int(rng.integers(12, 40))
    blobs = rng.normal(0, 35, (height // cell + 2, width // cell + 2, 3))
    blobs = np.kron(blobs, np.ones((cell, cell, 1)))[:height, :width]
    noise = rng.normal(0, rng.uniform(36, 56), (height, width, 3))
    image = Image.fromarray(np.clip(base + blobs + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 14))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(10, width // 2 + 11)), y0 + int(rng.integers(10, height // 2 + 11))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def jpeg_bytes(image: Image.Image, quality: int, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, **save_options)
    return buffer.getvalue()


def _pick_size(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[int, int]:
    return spec.image_size or REALISTIC_SIZES[int(rng.integers(len(REALISTIC_SIZES)))]


def quirk_bytes(kind: str, rng: np.random.Generator, spec: SyntheticSpec) -> bytes:
    width, height = _pick_size(rng, spec)
    image = synthetic_image(rng, width, height)
    if kind == "cmyk":
        return jpeg_bytes(image.convert("CMYK"), spec.quality)
    if kind == "png_as_jpeg":
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue()
    if kind == "grayscale":
        return jpeg_bytes(image.convert("L"), spec.quality)
    if kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = EXIF_ROTATE_90_CW
        return jpeg_bytes(image, spec.quality, exif=exif.tobytes())
    if kind == "truncated":
        full = jpeg_bytes(image, spec.quality)
        return full[: len(full) // 2]
    if kind == "zero_byte":
        return b""
    if kind == "text_file":
        return b"This is not an image: a text file saved under a .JPEG name.\n"
    raise ValueError(f"unknown quirk kind {kind!r}")


def _write(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


def _write_train(out: Path, spec: SyntheticSpec, rng: np.random.Generator, quirks: dict) -> None:
    for cls in range(spec.classes):
        for i in range(spec.per_class):
            image = synthetic_image(rng, *_pick_size(rng, spec))
            _write(out / "train" / wnid(cls) / f"{wnid(cls)}_{i + 1}.JPEG", jpeg_bytes(image, spec.quality))
    if spec.quirks:
        for position, (kind, fate) in enumerate(TRAIN_QUIRKS.items()):
            folder = wnid(position % spec.classes)
            relpath = f"train/{folder}/{folder}_{kind}.JPEG"
            _write(out / relpath, quirk_bytes(kind, rng, spec))
            quirks[relpath] = {"kind": kind, "fate": fate}


def _val_labels(spec: SyntheticSpec, rng: np.random.Generator) -> list[int]:
    labels = [cls for cls in range(spec.classes) for _ in range(spec.val_per_class)]
    return [labels[i] for i in rng.permutation(len(labels))]


def _write_val(out: Path, spec: SyntheticSpec, rng: np.random.Generator, quirks: dict) -> list[tuple[str, int]]:
    labels = _val_labels(spec, rng)
    quirk_at = dict(zip(range(len(labels)), VAL_QUIRKS)) if spec.quirks else {}
    written = []
    for index, cls in enumerate(labels):
        name = f"ILSVRC2012_val_{index + 1:08d}.JPEG"
        relpath = f"val/{name}" if spec.val_layout == "flat" else f"val/{wnid(cls)}/{name}"
        if index in quirk_at:
            kind = quirk_at[index]
            payload = quirk_bytes(kind, rng, spec)
            quirks[relpath] = {"kind": kind, "fate": VAL_QUIRKS[kind]}
        else:
            payload = jpeg_bytes(synthetic_image(rng, *_pick_size(rng, spec)), spec.quality)
        _write(out / relpath, payload)
        written.append((name, cls))
    return written


def devkit_order(classes: int, rng: np.random.Generator) -> list[int]:
    """A devkit-like class order: a permutation that is NOT the sorted order (when there are 2+ classes)."""
    order = [int(i) for i in rng.permutation(classes)]
    return order[::-1] if order == sorted(order) else order


def write_ground_truth_files(out: Path, val: list[tuple[str, int]], spec: SyntheticSpec, rng) -> None:
    from scipy.io import savemat

    kaggle = ["ImageId,PredictionString"] + [f"{Path(n).stem},{wnid(c)} 0 0 10 10" for n, c in val]
    (out / "LOC_val_solution.csv").write_text("\n".join(kaggle) + "\n")
    order = devkit_order(spec.classes, rng)  # order[k] = class of ILSVRC2012_ID k+1
    ids = {cls: position + 1 for position, cls in enumerate(order)}
    (out / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[c]}\n" for _, c in val))
    synsets = np.empty((len(order), 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    for position, cls in enumerate(order):
        synsets[position, 0] = (position + 1, wnid(cls), f"synthetic class {cls}", 0)
    savemat(str(out / "meta.mat"), {"synsets": synsets})
    (out / "val_pairs.txt").write_text("".join(f"{n} {wnid(c)}\n" for n, c in val))
    (out / "imagenet_2012_validation_synset_labels.txt").write_text("".join(f"{wnid(c)}\n" for _, c in sorted(val)))


def write_synthetic(out: Path, spec: SyntheticSpec) -> dict[str, dict[str, str]]:
    """Write the folder; returns (and saves as quirks.json) relpath -> {kind, fate} of every quirk file."""
    rng = np.random.default_rng(spec.seed)
    quirks: dict[str, dict[str, str]] = {}
    _write_train(out, spec, rng, quirks)
    val = _write_val(out, spec, rng, quirks)
    if spec.val_layout == "flat":
        write_ground_truth_files(out, val, spec, rng)
    (out / "quirks.json").write_text(json.dumps(quirks, indent=1, sort_keys=True) + "\n")
    return quirks

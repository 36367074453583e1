"""Real photographs at ImageNet's sizes and JPEG statistics, for loader benchmarks and tests.

The pixels are real photos bundled with scikit-learn (china, flower) and scikit-image (astronaut, coffee,
chelsea, rocket, motorcycle, hubble, ...; needs `pip install scikit-image`, which the test extra brings).
Each output file is a random crop of one of them, resized (Lanczos) to a size drawn from ImageNet's train
set and re-encoded the way ImageNet's files are (measured on 1,000 real train JPEGs: median 500x375, most
common 500x375 and 500x333, ~7 % with a short side under 224; mean file 110 KB; chroma 4:4:4 in 76 %, 4:2:0
in 20 %, 4:2:2 in 1 %; 2.3 % grayscale; baseline, not progressive). The class of a file is the photo it
was cut from.

Upscaled crops of a 640x427 photo hold less fine detail than a camera's 500x375 frame and compress better,
so the JPEG quality is set per file to bring the mean size near ImageNet's; `photo_stats` reports what was
written, to compare with the figures above.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# (photo name, loader): loaders return an RGB or grayscale uint8 array.
# The files of scikit-image's data folder that are photographs (the rest are drawings, scans and test patterns).
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "camera.png",
                  "grass.png", "gravel.png", "brick.png", "moon.png")
SKLEARN = ("china.jpg", "flower.jpg")
# ImageNet's most common frames (landscape; a quarter are turned to portrait) and a tail of other sizes.
COMMON_FRAMES = ((500, 375), (500, 333), (500, 400), (500, 281), (500, 500))
COMMON_WEIGHTS = (0.45, 0.25, 0.1, 0.1, 0.1)
SUBSAMPLING = ((0, 0.76), (2, 0.21), (1, 0.03))  # Pillow: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0
GRAY_FRACTION = 0.023
QUALITY_RANGE = (94, 99)  # see the module docstring: chosen so the mean file size lands near ImageNet's


@dataclass(frozen=True)
class PhotoStats:
    files: int
    mean_width: float
    mean_height: float
    mean_kb: float
    short_side_under_224: float  # fraction


def bundled_photos() -> dict[str, Image.Image]:
    """Every bundled photo, RGB or grayscale ("L"), by name."""
    from importlib.util import find_spec

    from sklearn.datasets import load_sample_image

    photos = {name.split(".")[0]: Image.fromarray(load_sample_image(name)) for name in SKLEARN}
    spec = find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("photos: scikit-image is needed for most of the photos (pip install scikit-image)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    for name in SKIMAGE_PHOTOS:
        with Image.open(folder / name) as image:
            photos[name.split(".")[0]] = image.convert("L" if image.mode in ("L", "I;16") else "RGB")
    return photos


def draw_frame(rng: random.Random) -> tuple[int, int]:
    """(width, height) as ImageNet's train files are sized."""
    if rng.random() < 0.8:
        width, height = rng.choices(COMMON_FRAMES, COMMON_WEIGHTS)[0]
    else:  # the tail: small thumbnails to large photos
        long_side = rng.randint(160, 800)
        width, height = long_side, round(long_side / rng.uniform(1.0, 1.6))
    return (height, width) if rng.random() < 0.25 else (width, height)


def cut_photo(rng: random.Random, photo: Image.Image, frame: tuple[int, int]) -> Image.Image:
    """A random crop of `photo` with the frame's aspect ratio, covering 60-100 % of what fits, resized."""
    width, height = frame
    fit = min(photo.width / width, photo.height / height)
    scale = fit * rng.uniform(0.6, 1.0)
    box_w, box_h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = rng.randint(0, photo.width - box_w), rng.randint(0, photo.height - box_h)
    image = photo.crop((left, top, left + box_w, top + box_h)).resize(frame, Image.Resampling.LANCZOS)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def encode(rng: random.Random, image: Image.Image) -> bytes:
    import io

    subsampling = rng.choices([s for s, _ in SUBSAMPLING], [w for _, w in SUBSAMPLING])[0]
    out = io.BytesIO()
    image.save(out, "JPEG", quality=rng.randint(*QUALITY_RANGE), subsampling=subsampling, optimize=False)
    return out.getvalue()


def write_photos(out: Path, count: int, seed: int = 0, val_fraction: float = 0.0) -> PhotoStats:
    """`count` files in out/train/<photo>/ (and out/val/<photo>/ for `val_fraction` of them)."""
    if count < 1:
        raise ValueError(f"photos: count must be >= 1, got {count}")
    rng = random.Random(seed)
    photos = dict(sorted(bundled_photos().items()))
    color = [name for name, photo in photos.items() if photo.mode == "RGB"]
    written: list[tuple[int, int, int]] = []
    for index in range(count):
        gray = rng.random() < GRAY_FRACTION  # ImageNet's rate; any photo, the grayscale ones included
        name = rng.choice(list(photos)) if gray else color[index % len(color)]
        split = "val" if rng.random() < val_fraction else "train"
        frame = draw_frame(rng)
        image = cut_photo(rng, photos[name], frame)
        data = encode(rng, image.convert("L") if gray else image)
        path = out / split / name / f"{name}_{index:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append((frame[0], frame[1], len(data)))
    return photo_stats(written)


def photo_stats(written: list[tuple[int, int, int]]) -> PhotoStats:
    sizes = np.array(written, dtype=np.float64)
    return PhotoStats(len(written), float(sizes[:, 0].mean()), float(sizes[:, 1].mean()),
                      float(sizes[:, 2].mean() / 1e3), float((sizes[:, :2].min(axis=1) < 224).mean()))

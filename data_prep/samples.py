"""Small datasets in the ImageNet folder layout, for the quickstart, tests and benchmarks.

    python -m data_prep.samples digits --out DIR [--size 32] [--val-fraction 0.2] [--seed 0]
    python -m data_prep.samples synthetic --out DIR [--classes 4] [--per-class 8] [--val-per-class 2]
                                          [--val-layout folders|flat] [--image-size 500x375] [--no-quirks]
    python -m data_prep.samples photos --out DIR [--count 1000] [--val-fraction 0] [--seed 0]

``digits``: scikit-learn's bundled real handwritten digits (1,797 8x8 scans, 10 classes), upscaled to
``size`` px RGB JPEGs in ``train/digitK/`` and ``val/digitK/`` (a stratified split fixed by the seed).
``synthetic``: ImageNet-sized JPEGs with every real-world quirk (see data_prep.synthetic).
``photos``: real photographs (scikit-learn's and scikit-image's bundled ones) cut and re-encoded to ImageNet's
sizes and JPEG statistics (see data_prep.photos), one class per photo.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.photos import write_photos
from data_prep.synthetic import SyntheticSpec, jpeg_bytes, write_synthetic

DIGIT_LEVELS = 16  # load_digits pixels are 0..16


def digit_class_name(label: int) -> str:
    return f"digit{label}"


def write_digits(out: Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0, quality: int = 95) -> dict[str, int]:
    """Returns the number of files written per split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if size < 8:
        raise ValueError(f"digits: size must be >= 8 px, got {size}")
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, val = train_test_split(indices, test_size=val_fraction, stratify=digits.target, random_state=seed)
    counts = {}
    for split, chosen in (("train", train), ("val", val)):
        for index in sorted(int(i) for i in chosen):
            label = int(digits.target[index])
            pixels = (digits.images[index] * (255 / DIGIT_LEVELS)).clip(0, 255).astype(np.uint8)
            image = Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
            path = out / split / digit_class_name(label) / f"{digit_class_name(label)}_{index:04d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg_bytes(image, quality))
        counts[split] = len(chosen)
    return counts


def parse_image_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"image size must look like 500x375, got {text!r}") from exc
    if width < 8 or height < 8:
        raise argparse.ArgumentTypeError(f"image size must be at least 8x8, got {text!r}")
    return width, height


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.samples", description=__doc__.split("\n\n")[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    digits = kinds.add_parser("digits", help="real handwritten digits from scikit-learn")
    digits.add_argument("--out", type=Path, required=True)
    digits.add_argument("--size", type=int, default=32, help="side of the upscaled images (px)")
    digits.add_argument("--val-fraction", type=float, default=0.2)
    digits.add_argument("--seed", type=int, default=0)
    synthetic = kinds.add_parser("synthetic", help="ImageNet-like JPEGs including every quirk")
    synthetic.add_argument("--out", type=Path, required=True)
    synthetic.add_argument("--classes", type=int, default=4)
    synthetic.add_argument("--per-class", type=int, default=8, help="train images per class")
    synthetic.add_argument("--val-per-class", type=int, default=2)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--val-layout", choices=("folders", "flat"), default="folders")
    synthetic.add_argument("--image-size", type=parse_image_size, default=None, help="WxH (default: ImageNet mix)")
    synthetic.add_argument("--no-quirks", action="store_true", help="only valid RGB JPEGs")
    photos = kinds.add_parser("photos", help="real photos at ImageNet's sizes and JPEG statistics")
    photos.add_argument("--out", type=Path, required=True)
    photos.add_argument("--count", type=int, default=1000)
    photos.add_argument("--val-fraction", type=float, default=0.0)
    photos.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"data_prep.samples: error: --out {args.out} exists and is not empty", file=sys.stderr)
        return 2
    try:
        if args.kind == "digits":
            counts = write_digits(args.out, args.size, args.val_fraction, args.seed)
            print(f"wrote digits to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        elif args.kind == "photos":
            stats = write_photos(args.out, args.count, args.seed, args.val_fraction)
            print(f"wrote {stats.files} photos to {args.out}: mean {stats.mean_width:.0f} x {stats.mean_height:.0f} px, "
                  f"{stats.mean_kb:.0f} KB, {100 * stats.short_side_under_224:.1f} % with a short side under 224")
        else:
            spec = SyntheticSpec(args.classes, args.per_class, args.val_per_class, args.seed, args.val_layout,
                                 args.image_size, quirks=not args.no_quirks)
            quirks = write_synthetic(args.out, spec)
            print(f"wrote synthetic set to {args.out}: {len(quirks)} quirk files listed in quirks.json")
    except ValueError as exc:
        print(f"data_prep.samples: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

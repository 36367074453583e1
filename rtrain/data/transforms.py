"""Augmentation geometry: which box of the source image becomes the output, flipped or not, relit or not.

A transform only looks at the source image's size (known from the JPEG header before decoding), so the
decoder can decode just enough of the image for the chosen box (see decode.py). Its randomness is a pure
function of (seed, epoch, sample key): the same sample gets the same crop whichever rank, worker or resumed
run reads it, and skipping samples on resume needs no random-number replay.

Boxes are integer pixel boxes in the source image, as torchvision's RandomResizedCrop uses. Where a
reference resizes first and crops second (eval resize+center crop, the paper's scale augmentation) the box
is the same crop mapped back to the source and rounded to whole pixels; the resulting scale differs from
the reference's by under 0.5 %.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Protocol

# AlexNet / fb.resnet.torch PCA lighting: eigenvalues and eigenvectors of ImageNet RGB covariance (0..1 scale).
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
CIFAR_PADDING = 4


@dataclass(frozen=True)
class View:
    """What to cut from a (width x height) source and how to present it.

    `box` is (left, top, right, bottom) in source pixels and may reach outside the image (CIFAR padding;
    the outside is black). `lighting` is an RGB offset in 0..255 units or None.
    """

    box: tuple[int, int, int, int]
    out_size: tuple[int, int]  # (height, width)
    flip: bool = False
    lighting: tuple[float, float, float] | None = None


class TransformConfig(Protocol):
    image_size: int
    eval_resize: int
    augment: str
    rrc_scale: tuple[float, float]
    rrc_ratio: tuple[float, float]
    scale_min: int
    scale_max: int
    pca_lighting: float
    eval_transform: str
    max_image_pixels: int


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """An RNG that depends only on (seed, epoch, key); stable across processes and Python versions."""
    digest = hashlib.blake2b(f"{seed}|{epoch}|{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def rrc_box(rng: random.Random, width: int, height: int, scale: tuple[float, float],
            ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawn from `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def _mapped_box(left: float, top: float, size: float, factor: float, width: int,
                height: int) -> tuple[int, int, int, int]:
    """A square `size` crop at (left, top) of an image resized by `factor`, mapped back to source pixels."""
    side = max(1, round(size / factor))
    x0 = min(max(0, round(left / factor)), max(0, width - side))
    y0 = min(max(0, round(top / factor)), max(0, height - side))
    return x0, y0, min(width, x0 + side), min(height, y0 + side)


def center_box(width: int, height: int, resize: int, crop: int) -> tuple[int, int, int, int]:
    """Resize the shorter side to `resize`, then center-crop `crop` (torchvision Resize + CenterCrop)."""
    factor = resize / min(width, height)
    new_w, new_h = width * factor, height * factor
    left, top = round((new_w - crop) / 2), round((new_h - crop) / 2)
    return _mapped_box(left, top, crop, factor, width, height)


def scale_jitter_box(rng: random.Random, width: int, height: int, smin: int, smax: int,
                     crop: int) -> tuple[int, int, int, int]:
    """He et al.: shorter side resized to a random S in [smin, smax], then a random crop x crop."""
    factor = rng.randint(smin, smax) / min(width, height)
    new_w, new_h = round(width * factor), round(height * factor)
    left = rng.randint(0, max(0, new_w - crop))
    top = rng.randint(0, max(0, new_h - crop))
    return _mapped_box(left, top, crop, factor, width, height)


def lighting_offset(rng: random.Random, alphastd: float) -> tuple[float, float, float]:
    alpha = [rng.gauss(0.0, alphastd) for _ in PCA_EIGVAL]
    return tuple(
        255.0 * sum(PCA_EIGVEC[c][k] * alpha[k] * PCA_EIGVAL[k] for k in range(3)) for c in range(3)
    )


def eval_view(cfg: TransformConfig, width: int, height: int) -> View:
    size = cfg.image_size
    if cfg.eval_transform == "cifar":
        return View((0, 0, width, height), (size, size))
    return View(center_box(width, height, cfg.eval_resize, size), (size, size))


def train_view(cfg: TransformConfig, rng: random.Random, width: int, height: int) -> View:
    size = cfg.image_size
    if cfg.augment == "none":
        view = eval_view(cfg, width, height)
    elif cfg.augment == "rrc":
        view = View(rrc_box(rng, width, height, cfg.rrc_scale, cfg.rrc_ratio), (size, size))
    elif cfg.augment == "scale":
        box = scale_jitter_box(rng, width, height, cfg.scale_min, cfg.scale_max, size)
        view = View(box, (size, size))
    elif cfg.augment == "cifar":
        # torchvision RandomCrop(size, padding=4): offsets into the zero-padded image.
        # (an image smaller than the crop even with the padding: the crop starts at the padding's corner)
        top = rng.randint(0, max(0, height + 2 * CIFAR_PADDING - size)) - CIFAR_PADDING
        left = rng.randint(0, max(0, width + 2 * CIFAR_PADDING - size)) - CIFAR_PADDING
        view = View((left, top, left + size, top + size), (size, size))
    else:
        raise ValueError(f"data.augment: unknown augmentation {cfg.augment!r}")
    if cfg.augment == "none":
        return view
    flip = rng.random() < 0.5
    lighting = lighting_offset(rng, cfg.pca_lighting) if cfg.pca_lighting > 0 else None
    return View(view.box, view.out_size, flip, lighting)


def make_view(cfg: TransformConfig, train: bool, seed: int, epoch: int, key: str, width: int,
              height: int) -> View:
    if not train:
        return eval_view(cfg, width, height)
    return train_view(cfg, sample_rng(seed, epoch, key), width, height)

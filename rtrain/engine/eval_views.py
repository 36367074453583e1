"""The views the paper's testing scores for one image: 10 crops, or the whole image at several scales.

10-crop (He et al. 2015 use AlexNet's "standard 10-crop testing"): the loader delivers the center square of
the image resized to `data.eval_resize` on its shorter side (AlexNet's 256 x 256); the four corner patches and
the center patch of `crop` x `crop` (224) and the horizontal mirrors of those five patches are the ten views.

Multi-scale (the paper's Table 4, after VGG): the whole image, aspect ratio kept, resized so its shorter side
is each of the scales (the paper: 224, 256, 384, 480, 640), run fully-convolutionally, together with its mirror.

Both are sized to the model's input (`data.image_size`), as timm sizes its eval transform: the rules are in
rtrain.data.eval_sizes (the eval loader needs them too, and rtrain.data imports nothing of the engine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rtrain.data.eval_sizes import (  # noqa: F401 - the sizing rules, re-exported for the engine's users
    MAX_SQUARE_PER_CROP,
    PAPER_CROP,
    PAPER_RESIZE,
    PAPER_SCALES,
    TenCropSquare,
    fitted_square,
    scales_for,
    scales_note,
    ten_crop_square,
)

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, right/bottom exclusive


def ten_crop_boxes(height: int, width: int, crop: int) -> list[Box]:
    """The five patch boxes in torchvision's five_crop order: top-left, top-right, bottom-left,
    bottom-right, center (center offsets rounded as torchvision's center_crop does)."""
    if height < crop or width < crop:
        raise ValueError(f"10-crop of {crop} px needs images at least that large, got {height}x{width}")
    top_c, left_c = int(round((height - crop) / 2)), int(round((width - crop) / 2))
    corners = [(0, 0), (width - crop, 0), (0, height - crop), (width - crop, height - crop), (left_c, top_c)]
    return [(left, top, left + crop, top + crop) for left, top in corners]


def ten_crops(x: torch.Tensor, crop: int) -> list[torch.Tensor]:
    """The five patches of (..., H, W) images, then the mirrors of the same five patches."""
    boxes = ten_crop_boxes(x.shape[-2], x.shape[-1], crop)
    patches = [x[..., top:bottom, left:right] for left, top, right, bottom in boxes]
    return patches + [patch.flip(-1) for patch in patches]


def shorter_side_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to `shorter`, aspect kept (torchvision's Resize(int)
    rule: the longer side is truncated, never rounded up)."""
    if height <= width:
        return shorter, max(1, int(shorter * width / height))
    return max(1, int(shorter * height / width)), shorter


def resize_whole(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A float (C, H, W) image resized to `size` with antialiased bilinear filtering (Pillow's and
    torchvision's filter, the loader's too)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", antialias=True,
                         align_corners=False)[0]


def groups_by_size(images: list[torch.Tensor], shorter: int) -> dict[tuple[int, int], list[int]]:
    """Indices of the images that share one resized size at this scale (stacked into one forward pass)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(shorter_side_size(image.shape[-2], image.shape[-1], shorter), []).append(index)
    return groups

"""How big the paper's testing views are for a model whose input is `crop` px (data.image_size): pure sizing
rules, shared by the eval loader (rtrain.data) and the scorer (rtrain.engine.eval_views). Imports nothing.

Both are sized to the model's input (`data.image_size`, the crop it was trained on), as timm derives its eval
transform from the model's input size and crop_pct (224 / 256 = 0.875): a 32-px CIFAR model's 10 crops are
32-px patches of a 36-px square (32 x 256 / 224), and its default scales are the paper's times 32 / 224
(32, 36, 54, 68, 91). The square is `data.eval_resize` where that fits the crop (between 1x and 2x it); a
recipe with the CIFAR eval transform (images taken whole at the model's input, eval_resize unused) whose
eval_resize does not fit gets the 256 / 224 square instead; a resize + center crop recipe keeps its
eval_resize (its center view comes from the same square) with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER_SCALES = (224, 256, 384, 480, 640)
PAPER_CROP, PAPER_RESIZE = 224, 256  # the paper's (AlexNet's) 10-crop patch and the square it is cut from
MAX_SQUARE_PER_CROP = 2  # a larger square leaves each patch under a quarter of it: not "the image" any more


def fitted_square(crop: int) -> int:
    """The 10-crop square for `crop`-px patches in the paper's proportion: 256 for 224, 36 for 32 (floored, as
    timm's int(size / crop_pct))."""
    return crop * PAPER_RESIZE // PAPER_CROP


def scales_for(crop: int) -> list[int]:
    """The paper's multi-scale shorter sides for a model whose input is `crop` px: PAPER_SCALES at 224,
    scaled by crop / 224 otherwise (floored; never below 1)."""
    return [max(1, scale * crop // PAPER_CROP) for scale in PAPER_SCALES]


@dataclass(frozen=True)
class TenCropSquare:
    """The side of the square 10-crop cuts `crop`-px patches from, and why it is not data.eval_resize (a
    one-line note for the user; None when it is, and fits)."""

    side: int
    note: str | None = None


def ten_crop_square(crop: int, eval_resize: int, eval_transform: str) -> TenCropSquare:
    """Where the 10 crops of a `crop`-px model come from (see the module doc). Raises ValueError when the
    recipe's square is smaller than the crop under the resize + center crop transform (its center view could
    not be cut either)."""
    fits = crop <= eval_resize <= MAX_SQUARE_PER_CROP * crop
    if fits:
        return TenCropSquare(eval_resize)
    fitted = fitted_square(crop)
    what = (f"ten_crop: data.eval_resize={eval_resize} does not fit the model's input of {crop} px "
            f"(data.image_size)")
    if eval_transform == "cifar":  # the recipe's own eval never used eval_resize: size it to the model
        return TenCropSquare(fitted, f"{what}; the CIFAR eval transform takes images whole, so the 10 crops "
                                     f"are cut from a {fitted}-px square ({crop} x {PAPER_RESIZE}/{PAPER_CROP})")
    if eval_resize < crop:
        raise ValueError(f"{what}: it is smaller than the crop; a {crop}-px model fits a square of {fitted} "
                         f"({crop} x {PAPER_RESIZE}/{PAPER_CROP}) up to {MAX_SQUARE_PER_CROP * crop}")
    share = (crop / eval_resize) ** 2
    return TenCropSquare(eval_resize, f"{what}: each crop sees {share:.1%} of the {eval_resize}-px square (the "
                                      f"recipe's center view is cut the same way); a {crop}-px model fits a "
                                      f"square of {fitted} ({crop} x {PAPER_RESIZE}/{PAPER_CROP}) up to "
                                      f"{MAX_SQUARE_PER_CROP * crop}")


def scales_note(crop: int, scales: list[int] | tuple[int, ...]) -> str | None:
    """A one-line warning when multi-scale shorter sides are far from the model's input (beyond the paper's
    range of 1x to 2.9x it, by more than a factor of two either way); None when they fit."""
    low, high = [s for s in scales if 2 * s < crop], [s for s in scales if s > 2 * PAPER_SCALES[-1] * crop
                                                       // PAPER_CROP]
    if not (low or high):
        return None
    return (f"multi_scale: scales {', '.join(map(str, low + high))} are far from the model's input of {crop} px "
            f"(data.image_size); the paper's scales for a {crop}-px model are "
            f"{', '.join(map(str, scales_for(crop)))}")

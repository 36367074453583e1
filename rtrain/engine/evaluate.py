"""Evaluation: top-1 / top-5 over the whole split, summed across ranks.

Modes (the paper's testing):
- center: one center crop per image (the loader's eval transform);
- ten_crop: the loader delivers a center square at `eval_resize`; the four corners and the center at
  `crop` and their mirrors are scored and the softmax averaged (Caffe's 10-crop, as in the paper);
- multi_scale: the square is resized to each of `scales` and the fully-convolutional network's softmax is
  averaged over scales (the paper's Table 4 testing, on the center square rather than the full image).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rtrain.config import PrecisionConfig
from rtrain.engine.precision import autocast
from rtrain.engine.step import Normalizer


def ten_crops(x: torch.Tensor, crop: int) -> list[torch.Tensor]:
    h, w = x.shape[-2:]
    if h < crop or w < crop:
        raise ValueError(f"10-crop of {crop} px needs images at least that large, got {h}x{w}")
    tops = (0, 0, h - crop, h - crop, (h - crop) // 2)
    lefts = (0, w - crop, 0, w - crop, (w - crop) // 2)
    crops = [x[..., t:t + crop, l:l + crop] for t, l in zip(tops, lefts)]
    return crops + [c.flip(-1) for c in crops]


def _views(x: torch.Tensor, mode: str, crop: int, scales: list[int]) -> list[torch.Tensor]:
    if mode == "center":
        return [x]
    if mode == "ten_crop":
        return ten_crops(x, crop)
    if mode == "multi_scale":
        return [F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
                for s in scales]
    raise ValueError(f"unknown eval mode {mode!r}; known: center, ten_crop, multi_scale")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, normalize: Normalizer, precision: PrecisionConfig, *,
             mode: str = "center", crop: int = 224, scales: list[int] | None = None) -> dict[str, float]:
    """Returns {"top1", "top5", "loss", "samples"} over every rank's share of the split."""
    device = normalize.device
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, count
    try:
        for images, labels in batches:
            x = normalize(images)
            y = labels.to(device, non_blocking=True)
            probs = torch.zeros((), device=device)
            views = _views(x, mode, crop, scales or [])
            for view in views:
                with autocast(precision, device):
                    logits = model(view)
                probs = probs + logits.float().softmax(dim=1)
            probs = probs / len(views)
            top5 = probs.topk(min(5, probs.shape[1]), dim=1).indices
            hits = top5 == y[:, None]
            sums += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                                 F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum"),
                                 torch.tensor(len(y), device=device)]).double()
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    correct1, correct5, loss_sum, count = sums.tolist()
    if count == 0:
        raise RuntimeError("evaluation saw no samples: is the val split empty?")
    return {"top1": correct1 / count, "top5": correct5 / count, "loss": loss_sum / count, "samples": count}

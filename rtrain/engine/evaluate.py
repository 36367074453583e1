"""Evaluation: top-1 / top-5 accuracy and error over the whole split, summed across ranks.

Modes (the paper's testing; the views themselves are eval_views.py):
- center: one view per image, as the loader delivers it (resize + center crop, or the CIFAR image);
- ten_crop: the four corner and the center `crop` patches of the loader's square (`eval_resize`, or sized to
  the crop where that does not fit it: eval_views.ten_crop_square) and their mirrors;
- multi_scale: fully-convolutional: the whole image at each of `scales` (shorter side; by default the paper's
  scaled to the crop, eval_views.scales_for) and its mirror. The batches are (list of uint8 (3, H, W) whole
  images, labels) from rtrain.data's WholeImageLoader; a uint8 (N, 3, H, W) tensor batch is taken as N whole
  (e.g. square) images. Training-time evaluation with eval.scales gets such tensor batches: the center
  `eval_resize` square of each image, so it scores that square at each scale, not the whole image (a warning
  says so; `rtrain eval --mode multi_scale` scores whole images).

Class scores: the softmax posteriors of an image's views are averaged (Caffe's 10-crop and VGG's multi-scale
testing, which the paper follows, average posteriors). Within one fully-convolutional view the network's
global average pool averages the class scores over positions, the same as averaging the fc's score map,
because the fc is linear. The loss is the NLL of the averaged posteriors.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rtrain.config import PrecisionConfig, Recipe
from rtrain.data import build_loader
from rtrain.engine.eval_views import (
    groups_by_size,
    resize_whole,
    scales_for,
    scales_note,
    ten_crop_square,
    ten_crops,
)
from rtrain.engine.precision import autocast
from rtrain.engine.step import Normalizer

EVAL_MODES = ("center", "ten_crop", "multi_scale")
log = logging.getLogger("rtrain.engine")


class ViewScorer:
    """Averaged softmax posteriors of an image batch's views under one mode."""

    def __init__(self, model: nn.Module, normalize: Normalizer, precision: PrecisionConfig, mode: str,
                 crop: int, scales: list[int] | None):
        if mode not in EVAL_MODES:
            raise ValueError(f"unknown eval mode {mode!r}; known: {', '.join(EVAL_MODES)}")
        self.model, self.normalize, self.precision = model, normalize, precision
        self.mode, self.crop = mode, crop
        self.scales = list(scales or scales_for(crop))  # the paper's at 224 px, in proportion otherwise

    def posteriors(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, self.normalize.device):
            logits = self.model(x)
        return logits.float().softmax(dim=1)

    def __call__(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if self.mode == "multi_scale":
            return self._multi_scale(list(images))
        x = self.normalize(images)
        if self.mode == "center":
            return self.posteriors(x)
        views = ten_crops(x, self.crop)
        return torch.stack([self.posteriors(view) for view in views]).mean(dim=0)

    def _multi_scale(self, images: list[torch.Tensor]) -> torch.Tensor:
        wholes = [self.normalize(image.unsqueeze(0))[0] for image in images]
        total: torch.Tensor | None = None
        for scale in self.scales:
            for size, indices in groups_by_size(wholes, scale).items():
                x = torch.stack([resize_whole(wholes[i], size) for i in indices])
                x = x.contiguous(memory_format=self.normalize.memory_format)
                scores = self.posteriors(x) + self.posteriors(x.flip(-1))
                if total is None:
                    total = scores.new_zeros((len(wholes), scores.shape[1]))
                total[indices] += scores
        if total is None:
            raise ValueError("multi_scale evaluation got an empty batch")
        return total / (2 * len(self.scales))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, normalize: Normalizer, precision: PrecisionConfig, *,
             mode: str = "center", crop: int = 224, scales: list[int] | None = None) -> dict[str, float]:
    """{"top1", "top5" (accuracies), "top1_error", "top5_error", "loss", "samples"} over every rank's share of
    the split. `scales` (multi_scale) defaults to the paper's 224, 256, 384, 480, 640 for a 224-px `crop`, and
    to those times crop / 224 for another (eval_views.scales_for)."""
    device = normalize.device
    score = ViewScorer(model, normalize, precision, mode, crop, scales)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, count
    try:
        for images, labels in batches:
            if len(labels) == 0:
                continue
            probs = score(images)
            sums += _batch_sums(probs, labels.to(device, non_blocking=True))
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    correct1, correct5, loss_sum, count = sums.tolist()
    if count == 0:
        raise RuntimeError("evaluation saw no samples: is the val split empty?")
    top1, top5 = correct1 / count, correct5 / count
    return {"top1": top1, "top5": top5, "top1_error": 1.0 - top1, "top5_error": 1.0 - top5,
            "loss": loss_sum / count, "samples": count}


def evaluator_from_config(recipe: Recipe, *, rank: int, world_size: int,
                          normalizer: Normalizer) -> Callable[[nn.Module], dict[str, float]]:
    """The periodic evaluation of a training run (eval section): its val loader on this rank, and a function
    that evaluates a model over the whole split from the start each time it is called."""
    e, data = recipe.eval, recipe.data
    mode = "ten_crop" if e.ten_crop else ("multi_scale" if e.scales else "center")
    notes: list[str | None] = []
    if mode == "ten_crop":  # the square the 10 crops are cut from, sized to the model's input where needed
        square = ten_crop_square(data.image_size, data.eval_resize, data.eval_transform)
        notes.append(square.note)
        cfg = data.model_copy(update={"image_size": square.side})
    elif mode == "multi_scale":  # the loader's center square, not the whole image (WholeImageLoader)
        square = ("each image squeezed to" if data.eval_transform == "cifar" else "the center of each image:")
        notes.append(f"eval.scales={list(e.scales)}: training-time evaluation scores {square} a square of "
                     f"data.eval_resize={data.eval_resize} px at each scale, not the whole image (aspect kept); "
                     "`rtrain eval RUN --mode multi_scale` scores whole images")
        notes.append(scales_note(data.image_size, e.scales))
        cfg = data.model_copy(update={"image_size": data.eval_resize})
    else:
        cfg = data
    for note in notes:
        if note and rank == 0:
            log.warning("%s", note)
    loader = build_loader(cfg, data.val_split, rank=rank, world_size=world_size,
                          batch_size=e.batch_size or recipe.micro_batch, seed=recipe.run.seed, train=False)
    passes = itertools.count()

    def run(model: nn.Module) -> dict[str, float]:
        loader.set_epoch(next(passes))  # a new pass from the start; eval covers every sample each time
        return evaluate(model, loader, normalizer, recipe.precision, mode=mode, crop=data.image_size,
                        scales=list(e.scales))

    return run


def _batch_sums(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    top5 = probs.topk(min(5, probs.shape[1]), dim=1).indices
    hits = top5 == labels[:, None]
    nll = F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), nll,
                        torch.tensor(len(labels), device=probs.device)]).double()

"""One train step: uint8 batch to the device, normalize there, autocast, accumulate, backend step.

Batches arrive as uint8 (4x fewer bytes to copy than float); conversion and normalization happen on the
device, folded into one multiply-add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rtrain.config import PrecisionConfig
from rtrain.distributed.backend import Backend
from rtrain.engine.precision import autocast


@dataclass(frozen=True)
class StepResult:
    loss: torch.Tensor  # mean loss over the step's micro-batches, detached, on the device
    stepped: bool
    found_inf: bool
    # (top-1 correct, top-5 correct, samples) of this rank's batch, as trained on (before the update)
    hits: torch.Tensor | None = None


class Normalizer:
    """uint8 (N, C, H, W) -> float (x / 255 - mean) / std, in one fused multiply-add on the device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                 channels_last: bool = False) -> None:
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        x = torch.addcmul(self.shift, x.float(), self.scale)
        return x.contiguous(memory_format=self.memory_format)


class TrainStep:
    def __init__(self, backend: Backend, normalizer: Normalizer, precision: PrecisionConfig, *,
                 accumulation_steps: int = 1, label_smoothing: float = 0.0) -> None:
        self.backend = backend
        self.normalize = normalizer
        self.precision = precision
        self.accumulation_steps = accumulation_steps
        self.label_smoothing = label_smoothing

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        device = self.normalize.device
        micro_images = images.chunk(self.accumulation_steps)
        micro_labels = labels.chunk(self.accumulation_steps)
        if len(micro_images) != self.accumulation_steps:
            raise ValueError(f"batch of {len(images)} cannot be split into "
                             f"train.accumulation_steps={self.accumulation_steps} micro-batches")
        total = torch.zeros((), device=device)
        hits = torch.zeros(3, device=device)
        for i, (x, y) in enumerate(zip(micro_images, micro_labels)):
            last = i == self.accumulation_steps - 1
            with self.backend.micro_context(last):
                with autocast(self.precision, device):
                    logits = self.backend.forward(self.normalize(x))
                target = y.to(device, non_blocking=True)
                loss = F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
                self.backend.backward(loss / self.accumulation_steps)
            total += loss.detach()
            hits += top_hits(logits.detach(), y.to(device, non_blocking=True))
        outcome = self.backend.step()
        return StepResult(loss=total / self.accumulation_steps, stepped=outcome.stepped,
                          found_inf=outcome.found_inf, hits=hits)


def top_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(top-1 correct, top-5 correct, samples) as floats: the training error curves of the paper."""
    k = min(5, logits.shape[1])
    top = logits.float().topk(k, dim=1).indices
    match = top == labels.view(-1, 1)
    return torch.stack([match[:, 0].sum(), match.any(dim=1).sum(), torch.tensor(len(labels), device=logits.device)]
                       ).float()

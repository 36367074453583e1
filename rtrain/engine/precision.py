"""Mixed precision: autocast dtype and loss scaling (dynamic, static, none), same code on CPU and CUDA."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch.amp import GradScaler

from rtrain.config import PrecisionConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(cfg: PrecisionConfig, device: torch.device) -> ContextManager:
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[cfg.dtype])


class StaticScaler(GradScaler):
    """A fixed loss scale: overflowing steps are still skipped, but the scale never changes."""

    def __init__(self, device: str, scale: float) -> None:
        super().__init__(device, init_scale=scale, growth_interval=2**31 - 1)
        self._static_scale = float(scale)

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        super().update(self._static_scale if new_scale is None else new_scale)


def build_scaler(cfg: PrecisionConfig, device: torch.device) -> GradScaler:
    """A GradScaler in every case (disabled for none) so the step has one code path."""
    if cfg.scaler == "dynamic":
        return GradScaler(device.type, init_scale=cfg.init_scale, growth_interval=cfg.growth_interval)
    if cfg.scaler == "static":
        return StaticScaler(device.type, cfg.static_scale)
    return GradScaler(device.type, enabled=False)

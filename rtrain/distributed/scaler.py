"""Loss scaling for the DDP backend (dynamic, static, none): a GradScaler in every case, one code path."""

from __future__ import annotations

import torch
from torch.amp import GradScaler

from rtrain.config import PrecisionConfig


class StaticScaler(GradScaler):
    """A fixed loss scale: overflowing steps are still skipped, but the scale never changes."""

    def __init__(self, device: str, scale: float) -> None:
        super().__init__(device, init_scale=scale, growth_interval=2**31 - 1)
        self._static_scale = float(scale)

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        super().update(self._static_scale if new_scale is None else new_scale)


def build_scaler(cfg: PrecisionConfig, device: torch.device) -> GradScaler:
    """precision.scaler as a GradScaler (disabled for none)."""
    if cfg.scaler == "dynamic":
        return GradScaler(device.type, init_scale=cfg.init_scale, growth_interval=cfg.growth_interval)
    if cfg.scaler == "static":
        return StaticScaler(device.type, cfg.static_scale)
    return GradScaler(device.type, enabled=False)

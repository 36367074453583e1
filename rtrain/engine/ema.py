"""Exponential moving average of the weights (buffers copied), for evaluation."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

EMA_VERSION = 1


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for ema_buf, buf in zip(self.module.buffers(), model.buffers()):
            ema_buf.copy_(buf)

    def state_dict(self) -> dict[str, Any]:
        return {"version": EMA_VERSION, "decay": self.decay, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != EMA_VERSION:
            raise ValueError(f"EMA state version {state.get('version')!r}, expected {EMA_VERSION}")
        self.module.load_state_dict(state["module"])

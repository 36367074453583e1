"""Mixed precision: the autocast dtype of the forward pass, same code on CPU and CUDA.

Loss scaling belongs to the backend that steps the optimizer (rtrain.distributed.scaler, DeepSpeed's own scaler).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from rtrain.config import PrecisionConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(cfg: PrecisionConfig, device: torch.device) -> ContextManager:
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[cfg.dtype])

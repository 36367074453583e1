"""Parameter and multiply-add counts, and the table behind `rtrain models`.

Multiply-adds follow the paper's convention: FLOPs / 2 of the convolutions and the fc layer, as
counted by torch.utils.flop_counter (BN, ReLU, pooling and the shortcut additions are not counted).
`model_rows` builds every model on the meta device, so no memory is allocated, no weights are
initialized for real and no arithmetic is done. On meta tensors BatchNorm runs through torch's
Python decompositions (most of the time on the 1202-layer net), and the flop counter does not count
it, so the row builder swaps the throwaway model's norm layers for identities before counting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.flop_counter import FlopCounterMode

from rtrain.models.registry import build, list_models, model_info


def count_params(model: nn.Module) -> int:
    """Number of trainable-or-not parameters (shared parameters counted once); buffers excluded."""
    return sum(p.numel() for p in model.parameters())


def _input_shape(input_size: int | Sequence[int], batch: int) -> tuple[int, ...]:
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        return (batch, 3, input_size, input_size)
    size = tuple(input_size)
    if len(size) == 2:
        return (batch, 3, *size)
    if len(size) == 3:
        return (batch, *size)
    raise ValueError(f"input_size={input_size!r} must be an int, (H, W) or (C, H, W)")


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in model.parameters():
        return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def count_macs(model: nn.Module, input_size: int | Sequence[int], batch: int = 1) -> int:
    """Multiply-adds of one forward pass over `batch` inputs of `input_size` (eval, no grad)."""
    device, dtype = _model_device_dtype(model)
    x = torch.zeros(_input_shape(input_size, batch), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def _replace_norm_layers_with_identity(model: nn.Module) -> None:
    """In place; shape- and multiply-add-neutral, since norm layers are not counted as MACs."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, _NormBase):
                setattr(parent, child_name, nn.Identity())


def model_rows() -> list[dict[str, Any]]:
    """One row per registered model: name, params, macs (at its default input size), input_size."""
    rows = []
    for name in list_models():
        info = model_info(name)
        with torch.device("meta"):
            model = build(name)
        params = count_params(model)
        _replace_norm_layers_with_identity(model)
        rows.append(
            {
                "name": name,
                "params": params,
                "macs": count_macs(model, info.input_size),
                "input_size": info.input_size,
            }
        )
    return rows

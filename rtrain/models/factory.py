"""A model built from the recipe's model section: registry name, options, optional starting weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rtrain.config import ModelConfig
from rtrain.models.registry import build, model_info
from rtrain.models.weights import import_torchvision, load_weights_file


def model_from_config(cfg: ModelConfig, num_classes: int, seed: int = 0) -> nn.Module:
    """Seeded so every rank starts from identical weights; `init_from` loads torchvision-format weights
    (fine-tuning onto another label set keeps the backbone and leaves the new head freshly initialised)."""
    options: dict[str, Any] = {"num_classes": num_classes, "zero_init_residual": cfg.zero_init_residual,
                               "checkpoint_stages": cfg.checkpoint_stages}
    if cfg.shortcut is not None:
        options["shortcut"] = cfg.shortcut
    if model_info(cfg.name).family == "imagenet":
        options["stride_in"] = cfg.stride_in
    if cfg.depth is not None:
        options["depth"] = cfg.depth
    torch.manual_seed(seed)
    model = build(cfg.name, **options)
    if cfg.init_from:
        state = load_weights_file(cfg.init_from)
        head = state.get("fc.weight")
        if head is not None and head.shape[0] != num_classes:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            import_torchvision(model, state, strict=False)
        else:
            import_torchvision(model, state)
    return model

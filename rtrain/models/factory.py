"""A model built from the recipe's model section: registry name, options, optional starting weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rtrain.config import ModelConfig
from rtrain.models.registry import build, model_info
from rtrain.models.weights import (
    InitFromError,
    WeightsFileError,
    import_torchvision,
    load_weights_file,
    strip_wrapper_prefixes,
)


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
        init_from(model, cfg.name, cfg.init_from, cfg.init_from_skip)
    return model


def init_from(model: nn.Module, name: str, path: str, skip: list[str]) -> None:
    """Load `path` into `model` strictly: every tensor of the file matched by name and shape, every tensor of
    the model found in the file, except names under a `skip` prefix (left as initialised); else one
    InitFromError naming model.init_from, the file and the first mismatches."""
    def skipped(key: str) -> bool:
        return any(key == prefix or key.startswith(prefix.rstrip(".") + ".") for prefix in skip)

    where = f"model.init_from={path}"
    hint = ("; to fine-tune onto another number of classes, leave the head out: model.init_from_skip=[fc]"
            if "fc" not in skip else "")
    try:
        state = {k: v for k, v in strip_wrapper_prefixes(load_weights_file(path)).items() if not skipped(k)}
        report = import_torchvision(model, state, strict=False)  # a shape mismatch raises here
    except WeightsFileError as exc:  # its message names the file
        raise WeightsFileError(f"model.init_from: {exc}") from exc  # --debug shows where it was read
    except ValueError as exc:
        raise InitFromError(f"{where}: does not fit {name}: {exc}{hint if 'fc.' in str(exc) else ''}") from None
    missing = [k for k in report.missing_keys if not skipped(k)]
    unexpected = report.unexpected_keys
    if missing or unexpected:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) of the file have no place in {name} "
                         f"(first: {', '.join(unexpected[:4])})")
        if missing:
            parts.append(f"{len(missing)} tensor(s) of {name} are not in the file (first: {', '.join(missing[:4])})")
        raise InitFromError(f"{where}: does not fit {name}: {'; '.join(parts)} (another architecture?); "
                            "list prefixes to leave out in model.init_from_skip")

"""Weight interchange with torchvision's ResNet state dicts (without importing torchvision).

Our ImageNet option-B v1.5 ResNets use torchvision's module names, so the key mapping is the
identity; what this module adds is the checking. The expected torchvision keys are derived from
torchvision's layout rules (`torchvision_keys`), independently of our module tree, and every
export/import is checked against them: missing or unexpected keys and shape mismatches raise with
the key names. Nets with no torchvision equivalent (CIFAR, plain, option A or C shortcuts, v1 stride
on the bottleneck's 1x1) are refused: their weights would load shape-for-shape into a torchvision
net that computes something else. `load_weights_file` reads such a file (e.g. torchvision's .pth)
with `torch.load(weights_only=True)`, so a weights file from elsewhere cannot run code.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from rtrain._errors import ExpectedError
from rtrain.models.resnet import ResNet, ResNetSpec

# Wrappers whose state-dict keys carry a prefix: DistributedDataParallel/DataParallel ("module.")
# and torch.compile's OptimizedModule ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# Checkpoints saved before PyTorch 0.4.1 (e.g. torchvision's original resnet downloads) lack these.
OPTIONAL_SUFFIX = ".num_batches_tracked"
MAX_KEYS_IN_MESSAGE = 8


class ImportReport(NamedTuple):
    """Keys that were absent from / surplus to the state dict (empty unless strict=False)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DDP/DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop leading "module." / "_orig_mod." (in any order, any number) from every key."""
    stripped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        bare = key
        while bare.startswith(WRAPPER_PREFIXES):
            bare = bare.split(".", 1)[1]
        if bare in stripped:
            raise ValueError(f"state dict keys {key!r} and another both map to {bare!r}")
        stripped[bare] = value
    return stripped


def _torchvision_incompatibility(spec: ResNetSpec) -> str | None:
    if spec.family != "imagenet":
        return "CIFAR ResNets have no torchvision equivalent"
    if not spec.residual:
        return "plain nets (no shortcuts) have no torchvision equivalent"
    if spec.shortcut != "B":
        return f"torchvision uses option-B shortcuts, this net uses option {spec.shortcut}"
    if spec.block == "bottleneck" and spec.stride_in != "3x3":
        return (
            "torchvision's bottleneck strides its 3x3 conv (v1.5); this net strides the 1x1 "
            "(stride_in='1x1', v1), so the same weights would compute a different function"
        )
    return None


def _require_torchvision_layout(model: nn.Module) -> ResNet:
    bare = unwrap_model(model)
    if not isinstance(bare, ResNet):
        raise TypeError(f"expected an rtrain ResNet, got {type(bare).__name__}")
    reason = _torchvision_incompatibility(bare.spec)
    if reason:
        raise ValueError(f"{bare.spec.name}: no torchvision weight layout: {reason}")
    return bare


def torchvision_keys(spec: ResNetSpec) -> list[str]:
    """State-dict keys of torchvision.models.ResNet for this architecture, in its order."""
    keys = ["conv1.weight", *(f"bn1.{k}" for k in BN_KEYS)]
    convs = 2 if spec.block == "basic" else 3
    expansion = 1 if spec.block == "basic" else 4
    in_channels = 64
    stage_shapes = zip(spec.stage_depths, spec.stage_widths, strict=True)
    for stage, (depth, width) in enumerate(stage_shapes, start=1):
        for index in range(depth):
            prefix = f"layer{stage}.{index}."
            for conv in range(1, convs + 1):
                keys += [f"{prefix}conv{conv}.weight", *(f"{prefix}bn{conv}.{k}" for k in BN_KEYS)]
            stride = 2 if stage > 1 and index == 0 else 1
            # torchvision's rule for when a block gets a projection (_make_layer).
            if index == 0 and (stride != 1 or in_channels != width * expansion):
                keys += [f"{prefix}downsample.0.weight"]
                keys += [f"{prefix}downsample.1.{k}" for k in BN_KEYS]
            in_channels = width * expansion
    return keys + ["fc.weight", "fc.bias"]


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_IN_MESSAGE])
    more = len(keys) - MAX_KEYS_IN_MESSAGE
    return shown + (f" ... and {more} more" if more > 0 else "")


def export_torchvision(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The model's state dict under torchvision.models.resnetNN's keys (loads strictly there).

    Like `state_dict()`, the tensors share storage with the model; clone them to keep a snapshot.
    """
    bare = _require_torchvision_layout(model)
    own = bare.state_dict()
    expected = torchvision_keys(bare.spec)
    missing = [k for k in expected if k not in own]
    surplus = [k for k in own if k not in set(expected)]
    if missing or surplus:
        raise RuntimeError(
            f"{bare.spec.name}: module tree does not match torchvision's layout; "
            f"absent: {_names(missing) or '-'}; surplus: {_names(surplus) or '-'}"
        )
    return OrderedDict((key, own[key].detach()) for key in expected)


def _check_shapes(spec: ResNetSpec, own: Mapping, incoming: Mapping) -> None:
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in incoming.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise ValueError(
            f"{spec.name}: shape mismatch in torchvision weights: {_names(mismatched)}"
        )


def import_torchvision(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> ImportReport:
    """Load a torchvision ResNet state dict into `model` (in place).

    Keys may carry "module." / "_orig_mod." prefixes. Absent `num_batches_tracked` entries (old
    checkpoints) are set to 0, as torch's BatchNorm does. With strict=True any other missing or
    unexpected key raises; with strict=False they are reported and skipped. Shape mismatches
    always raise.
    """
    bare = _require_torchvision_layout(model)
    spec = bare.spec
    bad_values = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad_values:
        raise ValueError(f"{spec.name}: state dict entries are not tensors: {_names(bad_values)}")
    incoming = strip_wrapper_prefixes(state_dict)
    own = bare.state_dict()
    expected = set(torchvision_keys(spec))
    missing = [k for k in own if k not in incoming and not k.endswith(OPTIONAL_SUFFIX)]
    unexpected = [k for k in incoming if k not in expected]
    if strict and (missing or unexpected):
        raise ValueError(
            f"{spec.name}: torchvision weights do not match; "
            f"missing keys: {_names(missing) or '-'}; "
            f"unexpected keys: {_names(unexpected) or '-'}"
        )
    _check_shapes(spec, own, incoming)
    merged = {k: incoming[k] for k in own if k in incoming}
    for key in own:
        if key.endswith(OPTIONAL_SUFFIX) and key not in incoming:
            merged[key] = torch.zeros_like(own[key])
    bare.load_state_dict(merged, strict=False)
    return ImportReport(missing, unexpected)


class WeightsFileError(ExpectedError, ValueError):
    """A weights file could not be read, or holds something other than a state dict of tensors."""


class InitFromError(ExpectedError, ValueError):
    """model.init_from's weights do not fit the model (names or shapes); the message names the file."""


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict file from elsewhere (e.g. torchvision's .pth), read with weights_only=True on the CPU."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable or unsafe files
        raise WeightsFileError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsFileError(f"{path}: not a state dict of tensors")
    return state

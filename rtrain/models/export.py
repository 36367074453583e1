"""Export to torchvision: the whole classifier (torchvision.models.resnetNN) or the backbone alone, as the
body of torchvision's detection backbones (`resnet_fpn_backbone(backbone_name="resnetNN", ...).body`).

rtrain's ImageNet option-B v1.5 ResNets use torchvision's module names (weights.py checks the layout and
refuses nets that have no torchvision equivalent: CIFAR, plain, option A/C, v1's 1x1 stride). The detection
body is an IntermediateLayerGetter over the ResNet without avgpool and fc, whose BatchNorms are
FrozenBatchNorm2d: weight, bias, running_mean and running_var, no num_batches_tracked. Hence the backbone
export drops `fc.*` and every `num_batches_tracked`, and its keys are exactly the body's.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from rtrain.models.resnet import IMAGENET_LAYERS
from rtrain.models.weights import OPTIONAL_SUFFIX, export_torchvision, unwrap_model

TORCHVISION_FORMAT = "torchvision"
EXPORT_FORMATS = (TORCHVISION_FORMAT,)


def torchvision_arch(model: nn.Module) -> str:
    """The torchvision builder that takes this model's export, e.g. "resnet50" (refuses nets without one)."""
    export_torchvision(model)  # raises ValueError naming the model when no torchvision layout exists
    spec = unwrap_model(model).spec
    depth = spec.depth
    if depth not in IMAGENET_LAYERS or IMAGENET_LAYERS[depth][1] != tuple(spec.stage_depths):
        raise ValueError(f"{spec.name}: torchvision has no resnet{depth} with stages {spec.stage_depths}")
    return f"resnet{depth}"


def is_backbone_key(key: str) -> bool:
    return not key.startswith("fc.") and not key.endswith(OPTIONAL_SUFFIX)


def torchvision_state_dict(model: nn.Module, backbone_only: bool = False) -> OrderedDict[str, torch.Tensor]:
    """Cloned tensors under torchvision's keys: the classifier's state dict, or (`backbone_only`) the
    detection body's (torchvision.models.detection.backbone_utils.resnet_fpn_backbone(...).body)."""
    torchvision_arch(model)
    state = export_torchvision(model)
    keys = [key for key in state if is_backbone_key(key)] if backbone_only else list(state)
    return OrderedDict((key, state[key].detach().clone().cpu()) for key in keys)

"""The ResNet zoo of He et al. (2015): builders, registry, torchvision weights, profiling."""

from rtrain.models.factory import model_from_config
from rtrain.models.profile import count_macs, count_params, model_rows
from rtrain.models.registry import (
    ModelInfo,
    ModelRegistry,
    build,
    list_models,
    model_info,
    register,
)
from rtrain.models.resnet import ResNet, ResNetSpec, cifar_resnet, imagenet_resnet
from rtrain.models.weights import ImportReport, export_torchvision, import_torchvision

__all__ = [
    "ImportReport",
    "ModelInfo",
    "ModelRegistry",
    "ResNet",
    "ResNetSpec",
    "build",
    "cifar_resnet",
    "count_macs",
    "count_params",
    "export_torchvision",
    "imagenet_resnet",
    "import_torchvision",
    "list_models",
    "model_from_config",
    "model_info",
    "model_rows",
    "register",
]

"""Model registry: names -> builders, with what each model is and which options it takes.

`build(name, **options)` validates the options against the model's list before building, so a typo
in a recipe fails with the model's name, the bad option and the valid ones. The default registry
holds the paper's zoo and is append-only (re-registering a name is an error); it is the one piece of
module-level state here, as the house plan asks for registries. Tests that register models use their
own `ModelRegistry()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from rtrain.models.resnet import IMAGENET_LAYERS, cifar_resnet, imagenet_resnet

FAMILIES = ("imagenet", "cifar")
DEFAULT_INPUT_SIZE = {"imagenet": 224, "cifar": 32}
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
CIFAR_PLAIN_DEPTHS = (20, 32, 44, 56, 110)

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """What a registered model is.

    `depth` is None for a family builder (cifar_resnet) that takes `depth` as an option.
    """

    name: str
    family: str
    input_size: int
    num_classes: int
    options: tuple[str, ...]
    required_options: tuple[str, ...] = ()
    depth: int | None = None
    block: str = "basic"
    residual: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(
                f"model {self.name!r}: family {self.family!r} is not one of {FAMILIES}"
            )
        missing = [o for o in self.required_options if o not in self.options]
        if missing:
            raise ValueError(f"model {self.name!r}: required options {missing} not in its options")

    @property
    def generic(self) -> bool:
        """A family builder (e.g. cifar_resnet with depth=...) rather than one concrete net."""
        return bool(self.required_options)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "input_size": self.input_size,
            "num_classes": self.num_classes,
            "depth": self.depth,
            "block": self.block,
            "residual": self.residual,
            "options": list(self.options),
            "required_options": list(self.required_options),
            "description": self.description,
        }


class ModelRegistry:
    """Append-only mapping of model names to (ModelInfo, builder)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[ModelInfo, Builder]] = {}

    def register(self, info: ModelInfo, builder: Builder) -> Builder:
        if info.name in self._entries:
            raise ValueError(f"model {info.name!r} is already registered")
        self._entries[info.name] = (info, builder)
        return builder

    def list_models(self, include_generic: bool = False) -> list[str]:
        """Registered names in registration order; family builders only when asked for."""
        return [
            name for name, (info, _) in self._entries.items() if include_generic or not info.generic
        ]

    def model_info(self, name: str) -> ModelInfo:
        return self._entry(name)[0]

    def build(self, name: str, **options: Any) -> nn.Module:
        info, builder = self._entry(name)
        unknown = sorted(set(options) - set(info.options))
        if unknown:
            raise ValueError(
                f"model {name!r} has no option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(info.options) or '(none)'}"
            )
        missing = [o for o in info.required_options if o not in options]
        if missing:
            raise ValueError(
                f"model {name!r} needs option(s) {', '.join(missing)}; "
                f"valid options: {', '.join(info.options)}"
            )
        return builder(**options)

    def _entry(self, name: str) -> tuple[ModelInfo, Builder]:
        if name not in self._entries:
            raise ValueError(
                f"unknown model {name!r}; valid models: "
                f"{', '.join(self.list_models(include_generic=True))}"
            )
        return self._entries[name]


RESNET_OPTIONS = ("shortcut", "stride_in", "zero_init_residual", "num_classes", "checkpoint_stages")
# Plain nets accept zero_init_residual so one recipe shape fits both kinds; only False is valid.
PLAIN_OPTIONS = ("stride_in", "zero_init_residual", "num_classes", "checkpoint_stages")
CIFAR_RESNET_OPTIONS = ("shortcut", "zero_init_residual", "num_classes", "checkpoint_stages")
CIFAR_PLAIN_OPTIONS = ("zero_init_residual", "num_classes", "checkpoint_stages")


def _register_imagenet(registry: ModelRegistry) -> None:
    for depth, (block, _) in IMAGENET_LAYERS.items():
        for residual, prefix, options in (
            (True, "resnet", RESNET_OPTIONS),
            (False, "plain", PLAIN_OPTIONS),
        ):
            info = ModelInfo(
                f"{prefix}{depth}",
                "imagenet",
                DEFAULT_INPUT_SIZE["imagenet"],
                1000,
                options,
                depth=depth,
                block=block,
                residual=residual,
                description=f"ImageNet {'ResNet' if residual else 'plain net'}-{depth}",
            )
            registry.register(info, partial(imagenet_resnet, depth, residual))


def _register_cifar(registry: ModelRegistry) -> None:
    for residual, prefix, depths, options in (
        (True, "cifar_resnet", CIFAR_DEPTHS, CIFAR_RESNET_OPTIONS),
        (False, "cifar_plain", CIFAR_PLAIN_DEPTHS, CIFAR_PLAIN_OPTIONS),
    ):
        kind = "ResNet" if residual else "plain net"
        for depth in depths:
            info = ModelInfo(
                f"{prefix}{depth}",
                "cifar",
                DEFAULT_INPUT_SIZE["cifar"],
                10,
                options,
                depth=depth,
                residual=residual,
                description=f"CIFAR {kind}-{depth}",
            )
            registry.register(info, partial(cifar_resnet, depth, residual))
        generic = ModelInfo(
            prefix,
            "cifar",
            DEFAULT_INPUT_SIZE["cifar"],
            10,
            ("depth", *options),
            required_options=("depth",),
            residual=residual,
            description=f"CIFAR {kind} of depth=6n+2",
        )
        registry.register(generic, partial(_cifar_by_depth, residual=residual))


def _cifar_by_depth(depth: int, residual: bool, **options: Any) -> nn.Module:
    return cifar_resnet(depth, residual, **options)


def paper_zoo() -> ModelRegistry:
    """A registry holding every net of He et al. (2015)."""
    registry = ModelRegistry()
    _register_imagenet(registry)
    _register_cifar(registry)
    return registry


_DEFAULT = paper_zoo()


def register(info: ModelInfo, builder: Builder) -> Builder:
    """Add a model to the default registry (names are never replaced)."""
    return _DEFAULT.register(info, builder)


def build(name: str, **options: Any) -> nn.Module:
    """Build a registered model; unknown names/options raise ValueError listing the valid ones."""
    return _DEFAULT.build(name, **options)


def list_models(include_generic: bool = False) -> list[str]:
    return _DEFAULT.list_models(include_generic)


def model_info(name: str) -> ModelInfo:
    return _DEFAULT.model_info(name)

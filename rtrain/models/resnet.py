"""The ResNets of He et al. (2015): ImageNet and CIFAR nets, with or without shortcuts.

One `ResNet` module covers both families; a frozen `ResNetSpec` says which net it is (the weight
interchange in weights.py reads it to decide whether a torchvision equivalent exists). Module names
are torchvision's: conv1/bn1/relu/maxpool/layer1..layerN/avgpool/fc.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from rtrain.models.activation_checkpoint import run_checkpointed, should_checkpoint
from rtrain.models.blocks import (
    SHORTCUT_OPTIONS,
    STRIDE_IN_OPTIONS,
    BasicBlock,
    Bottleneck,
    conv3x3,
    make_shortcut,
)

IMAGENET_LAYERS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)
BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


@dataclass(frozen=True)
class ResNetSpec:
    """Everything that decides a ResNet's architecture (not its weights)."""

    name: str
    family: str  # "imagenet" | "cifar"
    block: str  # "basic" | "bottleneck"
    stage_depths: tuple[int, ...]
    stage_widths: tuple[int, ...]
    residual: bool = True
    shortcut: str = "B"
    stride_in: str = "3x3"
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if self.family not in ("imagenet", "cifar"):
            raise ValueError(f"{self.name}: family={self.family!r} is not 'imagenet' or 'cifar'")
        if self.block not in BLOCKS:
            raise ValueError(f"{self.name}: block={self.block!r} is not one of {sorted(BLOCKS)}")
        if self.shortcut not in SHORTCUT_OPTIONS:
            raise ValueError(
                f"{self.name}: shortcut={self.shortcut!r} is not one of "
                f"{', '.join(SHORTCUT_OPTIONS)}"
            )
        if self.stride_in not in STRIDE_IN_OPTIONS:
            raise ValueError(
                f"{self.name}: stride_in={self.stride_in!r} is not one of "
                f"{', '.join(STRIDE_IN_OPTIONS)}"
            )
        if (
            not isinstance(self.num_classes, int)
            or isinstance(self.num_classes, bool)
            or (self.num_classes < 1)
        ):
            raise ValueError(f"{self.name}: num_classes={self.num_classes!r} must be an int >= 1")
        if len(self.stage_depths) != len(self.stage_widths):
            raise ValueError(f"{self.name}: stage_depths and stage_widths differ in length")

    @property
    def num_stages(self) -> int:
        return len(self.stage_depths)

    @property
    def depth(self) -> int:
        """Weighted layers as the paper counts them: convs on the main path plus the fc."""
        convs_per_block = 2 if self.block == "basic" else 3
        return 1 + convs_per_block * sum(self.stage_depths) + 1


def stages_to_checkpoint(
    name: str, checkpoint_stages: bool | Iterable[int] | None, num_stages: int
) -> frozenset[int]:
    """The checkpoint_stages option as a set of 1-based stage numbers (layer1 is stage 1)."""
    valid = range(1, num_stages + 1)
    if checkpoint_stages is None or checkpoint_stages is False:
        return frozenset()
    if checkpoint_stages is True:
        return frozenset(valid)
    if isinstance(checkpoint_stages, (str, bytes)) or not isinstance(checkpoint_stages, Iterable):
        raise ValueError(
            f"{name}: checkpoint_stages={checkpoint_stages!r} must be a bool or a list of stage "
            f"numbers in {list(valid)}"
        )
    stages = list(checkpoint_stages)
    bad = [s for s in stages if isinstance(s, bool) or not isinstance(s, int) or s not in valid]
    if bad:
        raise ValueError(
            f"{name}: checkpoint_stages has invalid stage(s) {bad}; valid stages are {list(valid)} "
            f"(stage i is layer{{i}})"
        )
    return frozenset(stages)


class ResNet(nn.Module):
    """A ResNet (or its plain counterpart) built from a `ResNetSpec`."""

    def __init__(
        self,
        spec: ResNetSpec,
        zero_init_residual: bool = False,
        checkpoint_stages: bool | Iterable[int] | None = False,
    ) -> None:
        super().__init__()
        if zero_init_residual and not spec.residual:
            raise ValueError(
                f"{spec.name}: zero_init_residual needs residual blocks; a plain net would output "
                "a constant"
            )
        self.spec = spec
        self.checkpointed_stages = stages_to_checkpoint(
            spec.name, checkpoint_stages, spec.num_stages
        )
        self._build_stem()
        in_channels = spec.stage_widths[0] if spec.family == "cifar" else 64
        stage_shapes = zip(spec.stage_depths, spec.stage_widths, strict=True)
        for index, (depth, width) in enumerate(stage_shapes):
            stride = 1 if index == 0 else 2
            stage, in_channels = self._make_stage(in_channels, width, depth, stride)
            self.add_module(f"layer{index + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, spec.num_classes)
        self._init_weights(zero_init_residual)

    def _build_stem(self) -> None:
        if self.spec.family == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            width = self.spec.stage_widths[0]
            self.conv1 = conv3x3(3, width)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.Identity()

    def _make_stage(
        self, in_channels: int, width: int, depth: int, stride: int
    ) -> tuple[nn.Sequential, int]:
        spec = self.spec
        block_cls = BLOCKS[spec.block]
        out_channels = width * block_cls.expansion
        blocks = []
        for index in range(depth):
            block_stride = stride if index == 0 else 1
            downsample = (
                make_shortcut(spec.shortcut, in_channels, out_channels, block_stride)
                if spec.residual
                else None
            )
            extra = {"stride_in": spec.stride_in} if spec.block == "bottleneck" else {}
            blocks.append(
                block_cls(in_channels, width, block_stride, downsample, spec.residual, **extra)
            )
            in_channels = out_channels
        return nn.Sequential(*blocks), out_channels

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            # Goyal et al.: each residual block starts as the identity (before its final ReLU).
            for block in self.blocks():
                nn.init.zeros_(block.last_bn.weight)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i}") for i in range(1, self.spec.num_stages + 1)]

    def blocks(self) -> list[BasicBlock | Bottleneck]:
        return [block for stage in self.stages() for block in stage]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (before global pooling)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        checkpointing = bool(self.checkpointed_stages) and should_checkpoint(self)
        for number, stage in enumerate(self.stages(), start=1):
            if checkpointing and number in self.checkpointed_stages:
                x = run_checkpointed(stage, x)
            else:
                x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))


def imagenet_resnet(
    depth: int,
    residual: bool = True,
    shortcut: str = "B",
    stride_in: str = "3x3",
    num_classes: int = 1000,
    zero_init_residual: bool = False,
    checkpoint_stages: bool | Iterable[int] | None = False,
) -> ResNet:
    """ImageNet ResNet-{18,34,50,101,152} (residual=True) or plain-{...} (residual=False).

    stride_in only matters for the bottleneck nets (50/101/152); basic blocks stride their first 3x3
    either way.
    """
    if depth not in IMAGENET_LAYERS:
        raise ValueError(f"ImageNet ResNet depth {depth!r} is not one of {sorted(IMAGENET_LAYERS)}")
    block, stage_depths = IMAGENET_LAYERS[depth]
    name = f"{'resnet' if residual else 'plain'}{depth}"
    spec = ResNetSpec(
        name,
        "imagenet",
        block,
        stage_depths,
        IMAGENET_WIDTHS,
        residual,
        shortcut,
        stride_in,
        num_classes,
    )
    return ResNet(spec, zero_init_residual, checkpoint_stages)


def cifar_blocks_per_stage(depth: int) -> int:
    """n for the paper's CIFAR depth 6n + 2."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"CIFAR ResNet depth={depth!r} must be 6n+2 with n >= 1 "
            "(20, 32, 44, 56, 110, 1202, ...)"
        )
    return (depth - 2) // 6


def cifar_resnet(
    depth: int,
    residual: bool = True,
    shortcut: str = "A",
    num_classes: int = 10,
    zero_init_residual: bool = False,
    checkpoint_stages: bool | Iterable[int] | None = False,
) -> ResNet:
    """CIFAR ResNet-{6n+2} (3 stages of n basic blocks, 16/32/64 filters) or its plain net."""
    n = cifar_blocks_per_stage(depth)
    name = f"cifar_{'resnet' if residual else 'plain'}{depth}"
    spec = ResNetSpec(
        name,
        "cifar",
        "basic",
        (n, n, n),
        CIFAR_WIDTHS,
        residual,
        shortcut,
        "3x3",
        num_classes,
    )
    return ResNet(spec, zero_init_residual, checkpoint_stages)

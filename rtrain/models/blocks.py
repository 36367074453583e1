"""Residual building blocks of He et al. (2015) and their shortcuts.

Attribute names follow torchvision's `BasicBlock` / `Bottleneck` (conv1/bn1/conv2/bn2[/conv3/bn3],
`downsample`) so that option-B ImageNet models share torchvision's state-dict keys one for one.
`downsample` is None for an identity shortcut, a parameter-free `ZeroPadShortcut` for option A and
`Sequential(conv1x1, bn)` for a projection (options B and C). Plain blocks (residual=False) have the
same layers and no shortcut at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUT_OPTIONS = ("A", "B", "C")
STRIDE_IN_OPTIONS = ("1x1", "3x3")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by BN, whose beta makes a conv bias redundant.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: identity with stride subsampling and zero-padded extra channels; no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"option-A shortcut cannot shrink channels ({in_channels} -> {out_channels})"
            )
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # F.pad lists dims from the last one: (W left, W right, H top, H bottom, C front, C back).
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra_channels}, stride={self.stride}"


def make_shortcut(
    shortcut: str, in_channels: int, out_channels: int, stride: int
) -> nn.Module | None:
    """The shortcut module of one residual block (None means identity)."""
    if shortcut not in SHORTCUT_OPTIONS:
        raise ValueError(f"shortcut={shortcut!r} is not one of {', '.join(SHORTCUT_OPTIONS)}")
    dims_change = stride != 1 or in_channels != out_channels
    if shortcut == "C" or (shortcut == "B" and dims_change):
        return nn.Sequential(
            conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
        )
    if shortcut == "A" and dims_change:
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return None


class _ResidualBlockBase(nn.Module):
    """Shared forward tail: optional addition of the shortcut, then the block's last ReLU."""

    expansion = 1
    residual: bool
    downsample: nn.Module | None

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut branch's output for x (identity when there is no downsample module)."""
        return x if self.downsample is None else self.downsample(x)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        raise NotImplementedError

    def _finish(self, residual_branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            residual_branch = residual_branch + self.shortcut(x)
        return self.relu(residual_branch)


class BasicBlock(_ResidualBlockBase):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR nets)."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if downsample is not None and not residual:
            raise ValueError("a plain block (residual=False) cannot have a shortcut")
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.residual = residual

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self._finish(out, x)


class Bottleneck(_ResidualBlockBase):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4), ResNet-50/101/152.

    stride_in="3x3" (v1.5, torchvision/MLPerf) strides the 3x3 conv; "1x1" (the paper's v1) strides
    the first 1x1 conv, which skips three quarters of the input positions and costs fewer
    multiply-adds.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        residual: bool = True,
        stride_in: str = "3x3",
    ) -> None:
        super().__init__()
        if stride_in not in STRIDE_IN_OPTIONS:
            raise ValueError(
                f"stride_in={stride_in!r} is not one of {', '.join(STRIDE_IN_OPTIONS)}"
            )
        if downsample is not None and not residual:
            raise ValueError("a plain block (residual=False) cannot have a shortcut")
        stride_1x1, stride_3x3 = (stride, 1) if stride_in == "1x1" else (1, stride)
        out_channels = planes * self.expansion
        self.conv1 = conv1x1(in_channels, planes, stride_1x1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride_3x3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.residual = residual

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self._finish(out, x)

"""Layer responses (He et al. 2015, Fig. 7): the standard deviation of each residual function's output.

The response of a block is its residual branch after the branch's last BN, before the addition of the
shortcut and the ReLU (for plain nets, the same point: they have the same layers and no shortcut). The paper
reads it off a fixed batch in eval mode; residual nets show smaller responses than plain ones, and deeper
nets smaller ones still. Pure torch: the composition root decides on which batch, how often and where the
numbers go.
"""

from __future__ import annotations

import torch
from torch import nn

from rtrain.models.blocks import _ResidualBlockBase
from rtrain.models.weights import unwrap_model


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual (or plain) blocks of a ResNet in forward order."""
    return [m for m in unwrap_model(model).modules() if isinstance(m, _ResidualBlockBase)]


@torch.no_grad()
def layer_responses(model: nn.Module, images: torch.Tensor) -> list[float]:
    """Std of each block's last-BN output on `images` (already normalized, on the model's device), in
    block order; the model is run in eval mode and left in the mode it was in."""
    bare = unwrap_model(model)
    blocks = residual_blocks(bare)
    if not blocks:
        raise ValueError(f"{type(bare).__name__}: no residual blocks to measure layer responses of")
    stds: list[torch.Tensor | None] = [None] * len(blocks)

    def hook_for(index: int):
        def record(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
            stds[index] = output.detach().float().std()
        return record

    handles = [block.last_bn.register_forward_hook(hook_for(i)) for i, block in enumerate(blocks)]
    was_training = bare.training
    bare.eval()
    try:
        bare(images)
    finally:
        bare.train(was_training)
        for handle in handles:
            handle.remove()
    return [float(s) for s in stds]
